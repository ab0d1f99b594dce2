"""The evaluation protocol of a condensed set: fresh networks trained on it, beside a random real subset of the
same size and the full data, on the source's own test rows; results cached per protocol, so reruns and
other methods share the baselines."""

from __future__ import annotations

import hashlib
import json
import math
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
from attar.distill.teacher_cache import model_hash
from attar.condense.api import _as_model_spec
from attar.errors import AttarError
from attar.metrics import classification_metrics
from attar.models import build_model, save_model
from attar.paths import home
from attar.specs import DataSpec, ModelSpec
from attar.train.config import TrainConfig
from attar.train.callbacks import Callback
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
                temperature: float = 1.0, return_model: bool = False, callbacks=(), teacher=None):
    """Train one freshly initialised net on (x, y) with the Trainer; return its test accuracy. ``soft``: learn these
    stored logits; ``teacher``: learn the teacher's logits on each augmented batch as it is drawn (per-crop
    relabelling, FKD/SRe²L style: the label follows the crop)."""
    torch.manual_seed(seed_of(seed, "eval-net"))
    net = build_model(model, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4,
                      schedule="step", step_every=max(1, epochs // 2), step_gamma=0.1)
    if soft is None and teacher is None:
        objective, cache = build_objective({"name": "ce"}), None
    else:
        objective = build_objective({"name": "label_free", "temperature": temperature})
        cache = _SoftTargets(soft) if teacher is None else None
    res = Trainer(net, objective, x, y, cfg, seed=seed, teacher_cache=cache, name=f"eval-{seed}",
                  num_classes=len(bundle.classes), augment=_augment_for(augment, bundle.mean, bundle.std),
                  callbacks=list(callbacks), teachers=None if teacher is None else [teacher.eval()]).fit()
    acc = float(classification_metrics(predict(res.model, test_x), test_y)["accuracy"])
    return (acc, res) if return_model else acc


def protocol_steps(n_rows: int, epochs: int, batch_size: int = 256) -> int:
    """Optimizer steps the protocol takes on ``n_rows`` rows in ``epochs`` epochs (the Trainer drops a short last batch)."""
    return epochs * max(1, n_rows // batch_size)


#: the full-data reference trains at least this many epochs' worth of steps (a budget that grows with the data)
FULL_MIN_EPOCHS = 30


def full_data_budget(n_rows: int, condensed_steps: int, epochs: int | None = None, batch_size: int = 256) -> dict[str, int]:
    """The full-data reference's budget: ``epochs`` when given, else enough epochs for at least
    ``FULL_MIN_EPOCHS`` passes and at least as many optimizer steps as a condensed-set net gets, so the
    reference is never the less-trained row; training stops earlier on a validation plateau
    (``patience_epochs`` epochs without a better validation accuracy; the best weights are kept).

    Why: a fixed 5 epochs was 25 steps on digits (1294 rows), far fewer than the 1000 steps of a
    100-image set, and the reference came out below the condensed set.
    """
    per_epoch = max(1, n_rows // batch_size)
    if epochs is None:
        epochs = max(FULL_MIN_EPOCHS, math.ceil(condensed_steps / per_epoch))
    return {"epochs": int(epochs), "steps": int(epochs) * per_epoch, "steps_per_epoch": per_epoch,
            "patience_epochs": max(5, int(epochs) // 10)}


class ValPlateau(Callback):
    """Early stop on a validation plateau: every epoch, score ``val``; stop after ``patience`` epochs without a
    better accuracy and put the best weights back at the end. ``val`` never holds test rows."""

    def __init__(self, val_x: torch.Tensor, val_y: torch.Tensor, patience: int, every: int):
        self.val_x, self.val_y, self.patience, self.every = val_x, val_y, patience, max(1, every)
        self.best, self.best_epoch, self.bad, self.epoch = -1.0, 0, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stopped = False

    def on_step_end(self, trainer, step: int) -> None:
        if step % self.every:
            return
        self.epoch = step // self.every
        acc = float(classification_metrics(predict(trainer.model, self.val_x), self.val_y)["accuracy"])
        if acc > self.best:
            self.best, self.best_epoch, self.bad = acc, self.epoch, 0
            self.best_state = trainer.model_state()
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self.stopped = True
                trainer.request_stop(f"validation plateau ({self.patience} epochs without a better accuracy)")

    def on_train_end(self, trainer) -> None:
        if self.best_state is not None:
            trainer.load_model_state(self.best_state)

    def info(self) -> dict[str, Any]:
        return {"stopped_early": self.stopped, "epochs_trained": self.epoch, "best_epoch": self.best_epoch,
                "val_accuracy": self.best}


def reference_split(bundle, seed: int = 0):
    """``(train_x, train_y, val_x, val_y, where)``: the source's own validation split when it has one (carved from
    its training data by the loader), else a stratified 10% carved here from the training rows (at least one
    row per class); never the test rows."""
    v = getattr(bundle, "val", None)
    if v is not None and len(v.y) and bool((v.y >= 0).any()):
        keep = v.y >= 0
        return bundle.train.x, bundle.train.y, v.x[keep], v.y[keep], "the source's validation split"
    y = bundle.train.y
    index = ClassIndex(y, len(bundle.classes))
    per = max(1, int(index.counts.min()) // 10)
    val_rows = index.draw(per, gen(seed, "reference-val")).flatten()
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val_rows] = False
    return bundle.train.x[mask], y[mask], bundle.train.x[val_rows], y[val_rows], "10% carved from the training rows"


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
    full_epochs: int | None = None,
    full_nets: int = 1,
    full_patience: int | None = None,
    soft: bool | None = None,
    temperature: float = 1.0,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    record: bool = True,
    log: Callable[[str], None] | None = None,
    ranking: bool = False,
    lrs_weight: float = 0.5,
    ars_weight: float = 0.5,
    relabel: str = "stored",
) -> dict[str, Any]:
    """The evaluation protocol: train ``nets`` fresh networks on the condensed set and report test accuracy.

    Beside it, always (unless switched off): the same protocol on a random real subset of equal
    size (a different subset per net), and networks trained on the full training split to a budget that
    grows with the data (``full_epochs``: None = :func:`full_data_budget`), stopped on a validation plateau
    (``full_patience`` epochs; 0 = never), cached by data hash, model and settings in ``cache_dir``. Soft labels,
    when the artifact has them (or ``soft=True``), are evaluated as a separate row: the nets then
    learn the stored logits (KL at ``temperature``), so that row carries a teacher's knowledge and
    is not comparable with the hard-label rows. Training uses SGD (lr 0.01, momentum 0.9, weight
    decay 5e-4, ×0.1 at half time, batch 256) and ``augment`` (``dsa``: per-sample DSA, the DSA/DM
    protocol; or trainer names like ``crop,flip``; or ``none``). Results are written to
    ``ARTIFACT/evaluation.json`` when ``record``.

    DD-Ranking's fair controls (:mod:`attar.condense.ranking`): with soft labels, the random real subsets
    are also trained on the *same teacher's* soft labels at the same temperature and with the same
    augmentation (``random_subset_soft``; the teacher is the artifact's soft-label teacher, else the
    full-data reference net). The label-robust score is reported whenever its four rows exist;
    ``ranking=True`` adds the rows trained without augmentation and the augmentation-robust score
    (``lrs_weight`` = DD-Ranking's w, ``ars_weight`` = its γ).

    ``relabel``: ``stored`` (the soft rows learn one stored label per image) or ``per_crop`` (the soft rows, the
    condensed set's and its equal-label control's alike, learn the teacher's logits on every augmented batch as it is
    drawn: SRe²L's FKD-style relabelling; needs the artifact's teacher). Without augmentation both are the same.
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
    if relabel not in ("stored", "per_crop"):
        raise AttarError(f"relabel must be stored or per_crop, got {relabel!r}.")
    live = None  # per-crop relabelling: the artifact's own teacher labels every augmented batch
    if relabel == "per_crop":
        if not use_soft:
            raise AttarError(f"relabel per_crop relabels the soft-label rows, and {artifact} has none (or soft is off); "
                             "condense with soft_labels=TEACHER.")
        live, live_where = _control_teacher(s, None)
        if live is None:
            raise AttarError(f"relabel per_crop needs the teacher that labelled {artifact}: {live_where.split(';')[0]}.")
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
        accs = [_train_eval(s.x, s.y, test_x, test_y, mspec, bundle, epochs, seed_of(seed, "soft", i), augment=augment,
                            soft=s.soft, temperature=temperature, teacher=live) for i in range(nets)]
        result["condensed_soft"] = _summary(accs) | {"temperature": temperature, "teacher": s.meta.get("soft_label_teacher"),
                                                     "relabel": relabel}
    if compare_random:
        result["random_subset"] = random_subset_accuracy(bundle, mspec, ipc, nets, epochs, augment, seed, test_x, test_y,
                                                         cache_dir, log)
    if full_data:
        result["full_data"] = full_data_accuracy(src, bundle, mspec, full_epochs, full_nets, augment, seed, test_x, test_y,
                                                 cache_dir, log, condensed_steps=protocol_steps(n, epochs),
                                                 patience=full_patience)
    teacher = None
    if use_soft and compare_random:  # per-crop: the teacher already loaded (the artifact's own comes first anyway)
        teacher, where = (live, live_where) if live is not None else _control_teacher(s, result.get("full_data"))
        if teacher is None:
            result.setdefault("caveats", []).append(where)
        else:
            result["random_subset_soft"] = random_subset_soft_accuracy(
                bundle, mspec, ipc, nets, epochs, augment, seed, test_x, test_y, teacher, temperature, log,
                per_crop=live is not None, cache_dir=cache_dir) | {"teacher": where, "temperature": temperature, "relabel": relabel}
    if ranking and compare_random and (teacher is not None or not use_soft):
        labels = {"soft": s.soft, "temperature": temperature} if use_soft else {}
        accs = [_train_eval(s.x, s.y, test_x, test_y, mspec, bundle, epochs, seed_of(seed, "syn" if not use_soft else "soft", i),
                            augment="none", **labels) for i in range(nets)]
        result["condensed_no_aug"] = _summary(accs)
        result["random_no_aug"] = (random_subset_soft_accuracy(bundle, mspec, ipc, nets, epochs, "none", seed, test_x, test_y,
                                                               teacher, temperature, log, cache_dir=cache_dir) if use_soft else
                                   random_subset_accuracy(bundle, mspec, ipc, nets, epochs, "none", seed, test_x, test_y,
                                                          cache_dir, log))
    scores = dd_ranking_scores(result, use_soft, lrs_weight, ars_weight)
    if scores:
        result["dd_ranking"] = scores
    caveats = result.pop("caveats", []) + _reference_caveats(result)
    if use_soft and "random_subset_soft" in result and result["condensed_soft"]["mean"] <= result["random_subset_soft"]["mean"]:
        caveats.append("with soft labels, the condensed set does not beat a random real subset given the same teacher's "
                       "labels and augmentation: its gain is the labels', not the images'")
    if "random_subset" in result and result["condensed"]["mean"] <= result["random_subset"]["mean"]:
        caveats.append("with hard labels, the condensed set does not beat a random real subset of the same size")
    if caveats:
        result["caveats"] = caveats
        for c in caveats:
            log(f"  note: {c}")
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


def random_rows(index: ClassIndex, ipc: int, seed: int, i: int) -> torch.Tensor:
    """The real rows of random subset ``i`` (``ipc`` per class): the hard- and soft-label controls share them."""
    return index.draw(ipc, gen(seed, "random-subset", i)).flatten()


def random_subset_soft_accuracy(bundle, mspec: ModelSpec, ipc: int, nets: int, epochs: int, augment: str | None,
                                seed: int, test_x, test_y, teacher, temperature: float, log=None,
                                per_crop: bool = False, cache_dir=None) -> dict[str, Any]:
    """DD-Ranking's control: the random subsets of :func:`random_subset_accuracy` (the same rows), trained like the
    soft-label row: on ``teacher``'s logits of those rows at ``temperature`` (``per_crop``: of every augmented batch),
    with the same ``augment``. Cached by the teacher's weights: every artifact labelled by one teacher shares it."""
    log = log or (lambda s: None)
    key = _protocol_key(bundle, mspec, epochs, nets, augment, seed, test_y) | {
        "ipc": ipc, "temperature": temperature, "per_crop": per_crop, "teacher": model_hash(teacher)}
    path = _cache_path("random-soft", key, cache_dir)
    if path.exists():
        return json.loads(path.read_text()) | {"cached": str(path)}
    index = ClassIndex(bundle.train.y, len(bundle.classes))
    accs = []
    for i in range(nets):
        rows = random_rows(index, ipc, seed, i)
        x = bundle.train.x[rows]
        soft = None if per_crop else predict(teacher, x).float()
        accs.append(_train_eval(x, bundle.train.y[rows], test_x, test_y, mspec, bundle, epochs, seed_of(seed, "rand-soft", i),
                                augment=augment, soft=soft, temperature=temperature,
                                teacher=teacher if per_crop else None))
        log(f"  random-subset (teacher's soft labels) net {i + 1}/{nets}: {accs[-1]:.4f}")
    out = _summary(accs)
    atomic_write_json(path, out)
    return out


def _control_teacher(s, full: dict[str, Any] | None):
    """``(model, where)`` that labels the soft-label control: the artifact's own soft-label teacher, else (labels the
    method learned itself, e.g. DATM) the first full-data reference net; ``(None, why)`` when there is neither."""
    from attar.models import load_model

    committee = s.meta.get("soft_label_committee")  # cvdd: the committee's weighted mixture labels the control too
    if committee and all(Path(p).exists() for p in committee["teachers"]):
        from attar.condense.bn_matching import Committee

        return Committee.load(committee["teachers"], committee["weights"]), \
            f"committee {', '.join(committee['teachers'])} (weights {', '.join(f'{w:.3f}' for w in committee['weights'])})"
    path = s.meta.get("soft_label_teacher")
    if path and Path(path).exists():
        return load_model(path)[0], str(path)
    if full and full.get("models"):
        return load_model(full["models"][0])[0], f"full-data reference net {full['models'][0]} (the artifact's labels " \
                                                  "are the method's own, with no teacher to reuse)"
    why = (f"the soft-label teacher {path} is missing" if path else "the soft labels have no teacher") + \
        "; no equal-label random control (run with the full-data reference to use its net as the teacher)"
    return None, why


def dd_ranking_scores(r: dict[str, Any], use_soft: bool, w: float = 0.5, gamma: float = 0.5) -> dict[str, Any]:
    """DD-Ranking's label- and augmentation-robust scores from the rows of an evaluation, where they exist."""
    from attar.condense.ranking import augmentation_robust_score, label_robust_score

    syn_any, rdm_any = ("condensed_soft", "random_subset_soft") if use_soft else ("condensed", "random_subset")
    out: dict[str, Any] = {}
    if all(k in r for k in ("full_data", "condensed", syn_any, rdm_any)):
        out["label_robust"] = label_robust_score(r["full_data"]["mean"], r["condensed"]["mean"], r[syn_any]["mean"],
                                                 r[rdm_any]["mean"], w) | {"syn_any": syn_any, "random_any": rdm_any}
    if all(k in r for k in (syn_any, rdm_any, "condensed_no_aug", "random_no_aug")):
        out["augmentation_robust"] = augmentation_robust_score(r[syn_any]["mean"], r[rdm_any]["mean"],
                                                               r["condensed_no_aug"]["mean"], r["random_no_aug"]["mean"], gamma)
    return out


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
        rows = random_rows(index, ipc, seed, i)
        accs.append(_train_eval(bundle.train.x[rows], bundle.train.y[rows], test_x, test_y, mspec, bundle, epochs,
                                seed_of(seed, "rand", i), augment))
        log(f"  random-subset net {i + 1}/{nets}: {accs[-1]:.4f}")
    out = _summary(accs)
    atomic_write_json(path, out)
    return out


def full_data_accuracy(src: DataSpec, bundle, mspec: ModelSpec, epochs: int | None, nets: int, augment: str | None,
                       seed: int, test_x, test_y, cache_dir=None, log=None, *, condensed_steps: int = 1000,
                       patience: int | None = None) -> dict[str, Any]:
    """Networks trained on the whole training split to the budget of :func:`full_data_budget` (``epochs``: None
    scales it with the data), stopping on a validation plateau (:func:`reference_split`; ``patience`` epochs,
    default the budget's; 0 = no early stop); cached on disk (keyed by data hash, budget and settings).

    The trained networks are kept as model artifacts next to the cached result (``models``), so they
    can serve as the soft-label teacher or the feature network of herding/k-center.
    """
    log = log or (lambda s: None)
    tr_x, tr_y, val_x, val_y, where = reference_split(bundle, seed)
    budget = full_data_budget(len(tr_y), condensed_steps, epochs)
    if patience is not None:
        budget["patience_epochs"] = int(patience)
    key = _protocol_key(bundle, mspec, budget["epochs"], nets, augment, seed, test_y) | {
        "reference": "plateau/1", "budget": budget, "val_rows": len(val_y)}
    path = _cache_path("full", key, cache_dir)
    if path.exists():
        return json.loads(path.read_text()) | {"cached": str(path)}

    accs, models, runs = [], [], []
    for i in range(nets):
        stop = [ValPlateau(val_x, val_y, budget["patience_epochs"], budget["steps_per_epoch"])] \
            if budget["patience_epochs"] > 0 else []
        acc, res = _train_eval(tr_x, tr_y, test_x, test_y, mspec, bundle, budget["epochs"],
                               seed_of(seed, "full", i), augment, return_model=True, callbacks=stop)
        accs.append(acc)
        run = {"steps": res.steps} | (stop[0].info() if stop else {"epochs_trained": budget["epochs"]})
        runs.append(run)
        mdir = path.with_suffix("") / f"net-{i}"
        save_model(mdir, res.model, mspec, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std,
                   extra={"test_accuracy": acc, "epochs": budget["epochs"], "data": src.model_dump(mode="json")})
        models.append(str(mdir))
        log(f"  full-data net {i + 1}/{nets}: {acc:.4f} ({res.steps}/{budget['steps']} steps"
            + (", stopped on a validation plateau)" if run.get("stopped_early") else ")"))
    out = _summary(accs) | {"epochs": budget["epochs"], "budget": budget, "rows": len(tr_y), "val_rows": len(val_y),
                            "val_from": where, "trained": runs, "models": models}
    atomic_write_json(path, out)
    return out


def _reference_caveats(result: dict[str, Any]) -> list[str]:
    """Say so when the full-data reference is not above a condensed row: then the data are too small (or the
    budget too short) for the comparison to mean what it usually means."""
    full = result.get("full_data")
    if not full:
        return []
    out = []
    for k in ("condensed", "condensed_soft", "random_subset"):
        if k in result and result[k]["mean"] > full["mean"]:
            out.append(f"the full-data reference ({100 * full['mean']:.2f}%) is below the {k.replace('_', ' ')} row "
                       f"({100 * result[k]['mean']:.2f}%) with {full['rows']} training rows and a budget of "
                       f"{full.get('budget', {}).get('steps', '?')} steps; raise --full-epochs or --full-nets to check")
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
             f"| full training data{_budget_note(r.get('full_data'))} | {cell('full_data')} |"]
    if "condensed_soft" in r:
        lines += ["", f"Soft labels (separate: they carry the teacher's knowledge): {cell('condensed_soft')}"]
    if "random_subset_soft" in r:
        lines += [f"Random real subset, same size, the same teacher's soft labels and augmentation (DD-Ranking's "
                  f"control): {cell('random_subset_soft')}"]
    if "condensed_no_aug" in r:
        lines += [f"Without augmentation: condensed {cell('condensed_no_aug')}; random subset {cell('random_no_aug')}"]
    d = r.get("dd_ranking", {})
    if "label_robust" in d:
        x = d["label_robust"]
        lines += [f"DD-Ranking label-robust score {x['lrs']:.1f} (HLR {100 * x['hlr']:.2f} pts, IOR {100 * x['ior']:+.2f} pts"
                  f" over the equal-label random subset, w {x['w']})"]
    if "augmentation_robust" in d:
        x = d["augmentation_robust"]
        lines += [f"DD-Ranking augmentation-robust score {x['ars']:.1f} (gain over random {100 * x['gain_aug']:+.2f} pts "
                  f"with augmentation, {100 * x['gain_no_aug']:+.2f} pts without, γ {x['gamma']})"]
    lines += [f"Note: {c}" for c in r.get("caveats", [])]
    return "\n".join(lines)


def _budget_note(full: dict[str, Any] | None) -> str:
    """`` (N rows; budget E epochs = S steps; trained ...)``: what the reference row was given and used."""
    if not full or "budget" not in full:
        return ""
    b, runs = full["budget"], full.get("trained", [])
    used = ", ".join(f"{t['steps']}" for t in runs)
    early = sum(bool(t.get("stopped_early")) for t in runs)
    return (f" ({full['rows']} rows; budget {b['epochs']} epochs = {b['steps']} steps; trained {used} steps"
            + (f", {early} stopped on a validation plateau of {full.get('val_rows', '?')} rows" if early else "") + ")")


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
