"""The evaluation protocol of a condensed set: fresh networks trained on it, beside a random real subset of the
same size and the full data, on the source's own test rows; results cached per protocol, so reruns and
other methods share the baselines."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from attar.checkpoint import atomic_write_json
from attar.condense.base import (
    ClassIndex,
    gen,
    seed_of,
)
from attar.data import load_data, make_augment
from attar.data.artifact import data_hash, load_synthetic
from attar.distill.objectives import build_objective
from attar.condense.api import _as_model_spec
from attar.errors import AttarError
from attar.metrics import classification_metrics
from attar.models import build_model, save_model
from attar.paths import home
from attar.specs import DataSpec, ModelSpec
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer, predict


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
