"""The public entry points: :func:`condense`, :func:`evaluate_condensed`, :func:`render_grid`.

Everything that can be checked before work starts is checked first (method name and parameters,
IPC against the smallest class, at least two classes, image data for image models, the output
folder), so a bad call fails in seconds with an :class:`~attar.errors.AttarError`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from attar.checkpoint import atomic_write_json
from attar.condense.base import (
    CONDENSERS,
    DEFAULT_MODEL,
    ClassIndex,
    CondenseContext,
    gen,
    seed_of,
)
from attar.data import load_data, make_augment
from attar.data.artifact import SyntheticSet, data_hash, load_synthetic, save_synthetic
from attar.distill.objectives import build_objective
from attar.errors import AttarError
from attar.metrics import classification_metrics
from attar.models import build_model, save_model
from attar.paths import home
from attar.specs import DataSpec, ModelSpec
from attar.train.config import TrainConfig
from attar.train.progress import StepProgress
from attar.train.trainer import Trainer, predict


def _as_data_spec(data: DataSpec | dict | str) -> DataSpec:
    if isinstance(data, DataSpec):
        return data
    if isinstance(data, str):
        return DataSpec(name=data) if not Path(data).is_dir() else DataSpec(imagefolder=data)
    try:
        return DataSpec.model_validate(data)
    except Exception as e:  # pydantic ValidationError
        raise AttarError(f"invalid data spec {data!r}: {e}") from None


def _as_model_spec(model: ModelSpec | dict | None) -> ModelSpec:
    if model is None:
        return DEFAULT_MODEL
    if isinstance(model, ModelSpec):
        return model
    try:
        return ModelSpec.model_validate(model)
    except Exception as e:
        raise AttarError(f"invalid model spec {model!r}: {e}") from None


def check_request(method: str, ipc: int, y: torch.Tensor, classes: list[str], data_name: str,
                  params: dict[str, Any] | None = None, init: str = "real"):
    """Validate a condensation request before any work; returns the configured method object."""
    cls = CONDENSERS.get(method)  # unknown method: lists the known ones
    condenser = cls(params)
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise AttarError(f"ipc (images per class) must be a positive integer, got {ipc!r}.")
    if init not in ("real", "noise"):
        raise AttarError(f"init must be 'real' (start from real samples) or 'noise', got {init!r}.")
    if len(classes) < 2:
        raise AttarError(
            f"data set {data_name!r} has {len(classes)} class(es); condensation learns a set that separates classes, "
            "so it needs at least two. Check label_column, or the folder layout (one sub-folder per class)."
        )
    counts = torch.bincount(y[y >= 0], minlength=len(classes))
    smallest = int(counts.min())
    if ipc > smallest:
        which = classes[int(counts.argmin())]
        raise AttarError(
            f"ipc={ipc} is larger than the smallest class of {data_name!r} (class {which!r} has {smallest} labeled "
            f"training rows); use ipc <= {smallest}, or add data to that class."
        )
    return condenser


def condense(
    data: DataSpec | dict | str,
    method: str,
    ipc: int,
    out_dir: str | Path,
    iterations: int | None = None,
    seed: int = 0,
    *,
    model: ModelSpec | dict | None = None,
    init: str = "real",
    params: dict[str, Any] | None = None,
    soft_labels: str | Path | None = None,
    flip: bool = False,
    zca: bool = False,
    zca_eps: float = 0.1,
    overwrite: bool = False,
    progress: bool | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Condense ``data`` into ``ipc`` images per class with ``method`` and write the artifact to ``out_dir``.

    ``model`` is the network the method matches through (default ConvNet width 128, depth 3);
    ``init`` starts learned images from real samples (``real``) or Gaussian noise with the data's
    statistics (``noise``); ``params`` are the method's own fields (``attar methods condense``).
    ``soft_labels`` names a model artifact (a teacher trained on the real data) whose logits on the
    final images are stored as soft labels. Plug-ins for methods that learn images: ``flip`` (FYI,
    flip-aware synthesis: the matching loss sees every synthetic image and its horizontal flip) and
    ``zca`` (the method runs in ZCA-whitened space, regularised by ``zca_eps``; the learned images are
    mapped back to pixel space before saving, see :mod:`attar.condense.zca`). Returns the artifact folder.
    """
    spec = _as_data_spec(data)
    mspec = _as_model_spec(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise AttarError(f"{out_dir} already exists and is not empty; choose another --out or pass overwrite.")
    cls = CONDENSERS.get(method)  # unknown method: fails here, listing the known ones, before data is read
    cls(params)  # bad method parameters: likewise
    bundle = load_data(spec)
    condenser = check_request(method, ipc, bundle.train.y, bundle.classes, bundle.name, params, init)
    if not bundle.is_image and mspec.arch != "mlp":
        raise AttarError(f"data set {bundle.name!r} is not images (shape {bundle.input_shape}); use model {{arch: mlp}}.")
    if iterations is None:
        iterations = cls.default_iterations
    if cls.learns_images and iterations < 1:
        raise AttarError(f"method {method!r} learns images and needs iterations >= 1, got {iterations}.")
    for name, on in (("flip", flip), ("zca", zca)):
        if on and not cls.learns_images:
            raise AttarError(f"{name} is a plug-in for methods that learn images (dm, datadam, dc, dsa, mtt); "
                             f"{method!r} selects real rows, so drop {name}.")
        if on and not bundle.is_image:
            raise AttarError(f"{name} needs image data [N, C, H, W]; {bundle.name!r} has inputs of shape {bundle.input_shape}.")
    teacher = None
    if soft_labels is not None and getattr(condenser.p, "soft_labels", False):
        raise AttarError(f"method {method!r} learns its own soft labels (params soft_labels: true); drop one of the two: "
                         f"the soft-label teacher {soft_labels} or that parameter.")
    if soft_labels is not None:
        from attar.models import load_model

        teacher, info = load_model(soft_labels)
        if int(info["num_classes"]) != len(bundle.classes) or tuple(info["input_shape"]) != tuple(bundle.input_shape):
            raise AttarError(
                f"soft-label teacher {soft_labels} predicts {info['num_classes']} classes on inputs {tuple(info['input_shape'])}, "
                f"but {bundle.name!r} has {len(bundle.classes)} classes and inputs {tuple(bundle.input_shape)}."
            )
    dev = torch.device(device)
    n_iter = iterations if cls.learns_images else 1
    t0 = time.perf_counter()
    train_hash = data_hash(bundle.train.x, bundle.train.y)
    condenser.preflight(model=mspec, data_name=bundle.name, data_hash=train_hash, input_shape=tuple(bundle.input_shape),
                        num_classes=len(bundle.classes), zca_eps=zca_eps if zca else None)
    x_ctx, mean_ctx, std_ctx, whitening = bundle.train.x, bundle.mean, bundle.std, None
    if zca:
        from attar.condense.zca import ZCA

        whitening = ZCA.fit(bundle.train.x, bundle.mean, bundle.std, zca_eps)
        x_ctx = torch.cat([whitening.whiten(bundle.train.x[i:i + 8192]) for i in range(0, len(bundle.train.x), 8192)])
        mean_ctx, std_ctx = torch.zeros_like(bundle.mean), torch.ones_like(bundle.std)
    with StepProgress(f"condense {method} ipc {ipc}", n_iter, enabled=progress) as bar:

        def step(i: int, m: dict[str, float]) -> None:
            bar.update(1, **m)
            if on_step is not None:
                on_step(i, m)

        ctx = CondenseContext(
            x=x_ctx, y=bundle.train.y, num_classes=len(bundle.classes), ipc=ipc,
            iterations=iterations if cls.learns_images else 0, seed=seed, model=mspec,
            mean=mean_ctx, std=std_ctx, init=init, device=dev, on_step=step,
            flip=flip, data_name=bundle.name, data_hash=train_hash, zca=whitening,
        )
        out = condenser.run(ctx)
        if whitening is not None:
            out.x = whitening.unwhiten(out.x)
        if not cls.learns_images:
            bar.update(1)
    seconds = time.perf_counter() - t0
    soft = out.soft
    if teacher is not None:
        from attar.train.trainer import predict

        soft = predict(teacher, out.x).float()
    meta = {
        "method": method,
        "ipc": ipc,
        "seed": seed,
        "iterations": iterations if cls.learns_images else 0,
        "init": init if cls.learns_images else "real",
        "params": condenser.p.model_dump(mode="json"),
        "model": mspec.model_dump(mode="json", exclude_none=True),
        "data_spec": spec.model_dump(mode="json"),
        "data_name": bundle.name,
        "data_hash": train_hash,
        "classes": list(bundle.classes),
        "input_shape": list(bundle.input_shape),
        "mean": bundle.mean.flatten().tolist(),
        "std": bundle.std.flatten().tolist(),
        "soft_label_teacher": str(soft_labels) if soft_labels is not None else None,
        "flip": bool(flip),
        "zca": whitening.info() if whitening is not None else None,
        "seconds": round(seconds, 3),
        "seconds_per_iteration": round(seconds / max(1, n_iter), 4),
        "torch": torch.__version__,
        "host": platform.node(),
        **({"selected_rows": out.extra["rows"]} if "rows" in out.extra else {}),
        **out.extra.get("meta", {}),
    }
    return save_synthetic(out_dir, SyntheticSet(out.x.float(), out.y.long(), meta, soft), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Evaluation protocol
# ----------------------------------------------------------------------------------------------


class _SoftTargets:
    """Duck-typed teacher cache for the Trainer: the stored soft-label logits of each row."""

    mode = "soft labels"

    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self._logits[idx]


def _augment_for(name: str | None, mean, std):
    if not name or name == "none":
        return None
    if name == "dsa":
        from attar.condense.augment import DSA

        return DSA(mean=mean, std=std)

    return make_augment(name)


def _train_eval(x, y, test_x, test_y, model: ModelSpec, bundle, epochs: int, seed: int, augment: str | None,
                soft: torch.Tensor | None = None, batch_size: int = 256, lr: float = 0.01,
                temperature: float = 1.0, return_model: bool = False):
    """Train one freshly initialised net on (x, y) with the Trainer; return its test accuracy."""
    torch.manual_seed(seed_of(seed, "eval-net"))
    net = build_model(model, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4,
                      schedule="step", step_every=max(1, epochs // 2), step_gamma=0.1)
    if soft is None:
        objective, cache = build_objective({"name": "ce"}), None
    else:
        objective = build_objective({"name": "label_free", "temperature": temperature})
        cache = _SoftTargets(soft)
    res = Trainer(net, objective, x, y, cfg, seed=seed, teacher_cache=cache, name=f"eval-{seed}",
                  num_classes=len(bundle.classes), augment=_augment_for(augment, bundle.mean, bundle.std)).fit()
    acc = float(classification_metrics(predict(res.model, test_x), test_y)["accuracy"])
    return (acc, res.model) if return_model else acc


def _summary(accs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "runs": accs, "n": len(accs)}


def default_epochs(n_rows: int) -> int:
    """Evaluation epochs: 1000 passes for tiny sets (as DSA/DM's protocol), fewer once the set has many batches."""
    return 1000 if n_rows <= 256 else max(50, 256_000 // n_rows)


def evaluate_condensed(
    artifact: str | Path,
    nets: int = 5,
    model: ModelSpec | dict | None = None,
    epochs: int | None = None,
    augment: str | None = "dsa",
    seed: int = 0,
    *,
    compare_random: bool = True,
    full_data: bool = True,
    full_epochs: int = 5,
    full_nets: int = 1,
    soft: bool | None = None,
    temperature: float = 1.0,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    record: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The evaluation protocol: train ``nets`` fresh networks on the condensed set and report test accuracy.

    Beside it, always (unless switched off): the same protocol on a random real subset of equal
    size (a different subset per net), and networks trained on the full training split
    (``full_epochs`` epochs, cached by data hash, model and settings in ``cache_dir``). Soft labels,
    when the artifact has them (or ``soft=True``), are evaluated as a separate row: the nets then
    learn the stored logits (KL at ``temperature``), so that row carries a teacher's knowledge and
    is not comparable with the hard-label rows. Training uses SGD (lr 0.01, momentum 0.9, weight
    decay 5e-4, ×0.1 at half time, batch 256) and ``augment`` (``dsa``: per-sample DSA, the DSA/DM
    protocol; or trainer names like ``crop,flip``; or ``none``). Results are written to
    ``ARTIFACT/evaluation.json`` when ``record``.
    """
    log = log or (lambda s: None)
    artifact = Path(artifact)
    s = load_synthetic(artifact)
    if nets < 1:
        raise AttarError(f"nets must be >= 1, got {nets}.")
    mspec = _as_model_spec(model or s.meta.get("model"))
    src = DataSpec.model_validate(s.meta["data_spec"])
    bundle = load_data(src)
    if s.meta.get("data_hash") and _bundle_hash(bundle) != s.meta["data_hash"]:
        raise AttarError(f"{artifact} was condensed from different data than {src.source} now loads; re-run condense.")
    if soft and s.soft is None:
        raise AttarError(f"{artifact} has no soft labels; condense with soft_labels=TEACHER to store them.")
    use_soft = s.soft is not None if soft is None else soft
    test_x, test_y = bundle.test.x, bundle.test.y
    if test_limit is not None and test_limit < len(test_y):
        from attar.condense.base import ClassIndex

        per = max(1, test_limit // len(bundle.classes))
        rows = ClassIndex(test_y, len(bundle.classes)).draw(per, gen(0, "test-limit")).flatten()
        test_x, test_y = test_x[rows], test_y[rows]
    n = len(s)
    epochs = epochs or default_epochs(n)
    ipc = int(s.meta.get("ipc") or max(1, n // len(bundle.classes)))
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "artifact": str(artifact), "method": s.meta.get("method"), "ipc": ipc, "size": n,
        "protocol": {"nets": nets, "model": mspec.model_dump(mode="json", exclude_none=True), "epochs": epochs,
                     "augment": augment or "none", "optimizer": "sgd lr 0.01 momentum 0.9 (nesterov) wd 5e-4, x0.1 at half",
                     "batch_size": 256, "test_rows": len(test_y), "seed": seed},
    }
    accs = []
    for i in range(nets):
        accs.append(_train_eval(s.x, s.y, test_x, test_y, mspec, bundle, epochs, seed_of(seed, "syn", i), augment))
        log(f"  condensed net {i + 1}/{nets}: {accs[-1]:.4f}")
    result["condensed"] = _summary(accs)
    if use_soft:
        accs = [_train_eval(s.x, s.y, test_x, test_y, mspec, bundle, epochs, seed_of(seed, "soft", i), augment,
                            soft=s.soft, temperature=temperature) for i in range(nets)]
        result["condensed_soft"] = _summary(accs) | {"temperature": temperature, "teacher": s.meta.get("soft_label_teacher")}
    if compare_random:
        result["random_subset"] = random_subset_accuracy(bundle, mspec, ipc, nets, epochs, augment, seed, test_x, test_y,
                                                         cache_dir, log)
    if full_data:
        result["full_data"] = full_data_accuracy(src, bundle, mspec, full_epochs, full_nets, augment, seed, test_x, test_y,
                                                 cache_dir, log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if record:
        atomic_write_json(artifact / "evaluation.json", result)
    return result


def _cache_path(kind: str, key: dict, cache_dir) -> Path:
    cache = Path(cache_dir or home() / "cache")
    blob = json.dumps(key, sort_keys=True, default=str)
    return cache / f"condense-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.json"


def _bundle_hash(bundle) -> str:
    """data_hash of the bundle's training split, computed once per bundle."""
    if "_train_hash" not in bundle.info:
        bundle.info["_train_hash"] = data_hash(bundle.train.x, bundle.train.y)
    return bundle.info["_train_hash"]


def _protocol_key(bundle, mspec: ModelSpec, epochs: int, nets: int, augment, seed: int, test_y) -> dict:
    return {"data": _bundle_hash(bundle), "model": mspec.model_dump(mode="json"), "epochs": epochs,
            "nets": nets, "augment": augment, "seed": seed, "test_rows": len(test_y),
            "test": hashlib.sha256(test_y.numpy().tobytes()).hexdigest()[:16]}


def random_subset_accuracy(bundle, mspec: ModelSpec, ipc: int, nets: int, epochs: int, augment: str | None, seed: int,
                           test_x, test_y, cache_dir=None, log=None) -> dict[str, Any]:
    """The protocol on random real subsets of ``ipc`` images per class (a different subset per net); cached,
    since every artifact of the same size is compared with the same row."""
    log = log or (lambda s: None)
    path = _cache_path("random", _protocol_key(bundle, mspec, epochs, nets, augment, seed, test_y) | {"ipc": ipc}, cache_dir)
    if path.exists():
        return json.loads(path.read_text()) | {"cached": str(path)}
    index = ClassIndex(bundle.train.y, len(bundle.classes))
    accs = []
    for i in range(nets):
        rows = index.draw(ipc, gen(seed, "random-subset", i)).flatten()
        accs.append(_train_eval(bundle.train.x[rows], bundle.train.y[rows], test_x, test_y, mspec, bundle, epochs,
                                seed_of(seed, "rand", i), augment))
        log(f"  random-subset net {i + 1}/{nets}: {accs[-1]:.4f}")
    out = _summary(accs)
    atomic_write_json(path, out)
    return out


def full_data_accuracy(src: DataSpec, bundle, mspec: ModelSpec, epochs: int, nets: int, augment: str | None, seed: int,
                       test_x, test_y, cache_dir=None, log=None) -> dict[str, Any]:
    """Networks trained on the whole training split; cached on disk (keyed by data hash and settings).

    The trained networks are kept as model artifacts next to the cached result (``models``), so they
    can serve as the soft-label teacher or the feature network of herding/k-center.
    """
    log = log or (lambda s: None)
    path = _cache_path("full", _protocol_key(bundle, mspec, epochs, nets, augment, seed, test_y), cache_dir)
    if path.exists():
        return json.loads(path.read_text()) | {"cached": str(path)}

    accs, models = [], []
    for i in range(nets):
        acc, net = _train_eval(bundle.train.x, bundle.train.y, test_x, test_y, mspec, bundle, epochs,
                               seed_of(seed, "full", i), augment, return_model=True)
        accs.append(acc)
        mdir = path.with_suffix("") / f"net-{i}"
        save_model(mdir, net, mspec, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std,
                   extra={"test_accuracy": acc, "epochs": epochs, "data": src.model_dump(mode="json")})
        models.append(str(mdir))
        log(f"  full-data net {i + 1}/{nets}: {acc:.4f}")
    out = _summary(accs) | {"epochs": epochs, "rows": len(bundle.train.y), "models": models}
    atomic_write_json(path, out)
    return out


def format_evaluation(r: dict[str, Any]) -> str:
    """A small Markdown table of an :func:`evaluate_condensed` result."""
    def cell(k: str) -> str:
        v = r.get(k)
        return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f} (n={v['n']})" if v else "—"

    p = r["protocol"]
    lines = [f"{r['method']} ipc {r['ipc']} ({r['size']} images); {p['nets']} nets {p['model']}, {p['epochs']} epochs, "
             f"augment {p['augment']}, {p['test_rows']} test rows", "", "| training set | test accuracy % |", "|---|---|",
             f"| condensed ({r['method']}) | {cell('condensed')} |", f"| random real subset, same size | {cell('random_subset')} |",
             f"| full training data | {cell('full_data')} |"]
    if "condensed_soft" in r:
        lines += ["", f"Soft labels (separate: they carry the teacher's knowledge): {cell('condensed_soft')}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def render_grid(artifact: str | Path | SyntheticSet, png: str | Path, max_per_class: int = 10) -> Path:
    """Save the condensed images as a PNG grid: one row per class, up to ``max_per_class`` columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = artifact if isinstance(artifact, SyntheticSet) else load_synthetic(artifact)
    if s.x.dim() != 4:
        raise AttarError("render_grid needs image data [N, C, H, W].")
    classes = s.meta.get("classes") or [str(c) for c in range(int(s.y.max()) + 1)]
    per = [torch.nonzero(s.y == c).flatten()[:max_per_class] for c in range(len(classes))]
    cols = max(1, max(len(p) for p in per))
    rows = len(classes)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 1.4, rows * 0.9 + 0.4), squeeze=False)
    for r, idx in enumerate(per):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c < len(idx):
                img = s.x[idx[c]].clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
            if c == 0:
                ax.set_ylabel(str(classes[r])[:12], rotation=0, ha="right", va="center", fontsize=8)
    title = f"{s.meta.get('method', '?')} ipc {s.meta.get('ipc', '?')} — {s.meta.get('data_name', '')}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
