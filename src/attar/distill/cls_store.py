"""Stored outputs of an image/table classifier teacher: the store format of :mod:`attar.data.teacher_store` with one
position per example (``kind: classifier``, ``width`` 1), read by three uses: distillation, relabelling a condensed
set and data selection. One teacher pass, written once, keyed by the rows it was made on.

* :func:`dump_classifier_teacher`: the teacher pass of :class:`~attar.distill.teacher_cache.TeacherCache`
  (:func:`~attar.distill.teacher_cache.teacher_log_probs`, so both see the same numbers; an ensemble's averaged
  probabilities too) over a split's rows, top-``k`` per example, ``shard_rows`` examples per shard; resumable (a
  killed dump keeps its finished shards), progress with ETA.
* :class:`StoredClassifierTeacher`: the store where the Trainer's teacher cache plugs in (``logits(idx) ->
  [B, C]``, ``mode``), as ``teacher: {store: DIR}`` in an image/table ``distill`` stage. The targets it returns are
  ``τ·l̂``: the stored top-k log-probs at their classes and every other class at ``log(tail / (C − k))`` (the tail
  spread evenly, as the in-RAM cache does), so ``softmax(τ·l̂ / τ)`` is the stored distribution. With ``k = C`` and
  ``values: f32`` that is the teacher's own distribution to float32 rounding at every temperature.
  :meth:`StoredClassifierTeacher.check` refuses a store made on other rows, for another class list, at a temperature
  the top-k is not exact at, or holding an LM's outputs, naming the mismatch.
* :func:`relabel_condensed`: a condensed set's soft labels from a store made on that set (``--data {artifact:
  DIR}``), written into the artifact's ``soft`` field, which ``condense evaluate`` reads.

Rows are identified by :func:`rows_hash` (the hash of the input tensor, the in-RAM cache's ``data_hash``), so a
store made with another data spec, seed, ``train_limit`` or condensed set is refused by name.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from attar.data.teacher_store import DEFAULT_STEP, StoreSettings, StoreWriter, TeacherStore
from attar.distill.teacher_cache import _LOG_FLOOR, model_hash, teacher_log_probs, tensor_hash
from attar.errors import AttarError

__all__ = ["rows_hash", "classes_fingerprint", "dump_classifier_teacher", "StoredClassifierTeacher",
           "relabel_condensed", "DEFAULT_SHARD_ROWS"]

DEFAULT_SHARD_ROWS = 4096
REBUILD_HINT = ("Dump the teacher again on this stage's training rows: attar teacher dump --model TEACHER --data "
                "'<the stage's data block>' --out DIR.")


def rows_hash(x: torch.Tensor) -> str:
    """What a classifier store records of its rows: the hash of the input tensor (every value, dtype and shape)."""
    return tensor_hash(x)


def classes_fingerprint(classes: Sequence[str]) -> str:
    """What the class ids mean (recorded in the store's ``tokenizer`` field): sha256 of the class names, in order."""
    return "classes:" + hashlib.sha256("\x00".join(map(str, classes)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- dumping


def dump_classifier_teacher(teacher: nn.Module | list[nn.Module], x: torch.Tensor, out: str | Path, *,
                            k: int | None = None, temperature: float = 1.0, step: float = DEFAULT_STEP,
                            values: str = "q8", classes: Sequence[str] | None = None, teacher_name: str = "",
                            data: str = "", shard_rows: int = DEFAULT_SHARD_ROWS, batch_size: int = 512,
                            zstd_level: int = 9, overwrite: bool = False, progress: bool | None = None,
                            on_shard: Callable[[int], None] | None = None) -> TeacherStore:
    """Run ``teacher`` (one model, or a list: their averaged probabilities) over the rows ``x`` and write its
    top-``k`` (default: every class) log-probs at temperature ``temperature`` per row into ``out``.

    ``values``: ``q8`` (one byte per log-prob, within ``step`` nats) or ``f32`` (exact). ``classes``: the class names
    (recorded as a fingerprint, so a reader with another class list is refused). A folder holding an unfinished dump
    with the same settings is resumed; one with other settings is refused (``overwrite`` replaces it)."""
    from attar.train.progress import StepProgress

    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    n = len(x)
    if n == 0:
        raise AttarError("teacher dump: the data's training split has no rows.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise AttarError(f"teacher dump: temperature must be positive, got {temperature!r}.")
    if values not in ("q8", "f32"):
        raise AttarError(f"teacher dump: values must be q8 (quantised) or f32 (exact), got {values!r}.")
    c = int(next(teacher_log_probs(teachers, x[:1], 1, temperature))[1].shape[1])  # the class count, from one row
    if classes is not None and len(classes) != c:
        raise AttarError(f"teacher dump: the teacher predicts {c} classes, the data has {len(classes)}; a teacher "
                         "for this data set is needed.")
    k = c if k is None else int(k)
    if not 1 <= k <= c:
        raise AttarError(f"teacher dump: k must be in [1, {c}] (the teacher's classes), got {k}.")
    h = model_hash(teachers[0]) if len(teachers) == 1 else \
        hashlib.sha256("".join(model_hash(t) for t in teachers).encode()).hexdigest()[:16]
    settings = StoreSettings(kind="classifier", teacher=teacher_name, teacher_hash=h,
                             tokenizer=classes_fingerprint(classes) if classes is not None else "", vocab_size=c, k=k,
                             temperature=float(temperature), step=float(step), values=values, data=data,
                             data_hash=rows_hash(x), rows=n, width=1, shard_rows=int(shard_rows), zstd_level=zstd_level)
    writer = StoreWriter(out, settings, overwrite=overwrite)
    todo = [i for i in range(writer.n_shards) if i not in writer.done]
    done_rows = n - sum(b - a for a, b in map(writer.shard_rows, todo))
    with StepProgress("teacher dump", n, done_rows, progress, unit="rows") as bar:
        for i in todo:
            a, b = writer.shard_rows(i)
            tops, inds, rests = [], [], []
            for _, logp in teacher_log_probs(teachers, x[a:b], batch_size, temperature):
                top, ind = logp.topk(k, dim=-1)
                rest = torch.logsumexp(logp.scatter(1, ind, float("-inf")), -1) if k < c else \
                    torch.full((len(logp),), float("-inf"))
                tops.append(top)
                inds.append(ind)
                rests.append(rest)
                bar.update(len(logp))
            writer.write(i, np.ones((b - a, 1), dtype=bool), torch.cat(tops).numpy(),
                         torch.cat(inds).numpy().astype(np.int64), torch.cat(rests).numpy())
            if on_shard is not None:
                on_shard(i)
    writer.finish()
    return TeacherStore.open(out, verify=False)


# ---------------------------------------------------------------------------------------------- reading


class StoredClassifierTeacher:
    """A classifier :class:`TeacherStore` read as the Trainer's teacher cache (module doc). All rows are decoded on
    first use (``k`` values, ids and a tail per example: small next to the inputs)."""

    def __init__(self, store: TeacherStore | str | Path):
        self.store = store if isinstance(store, TeacherStore) else TeacherStore.open(store)
        st = self.store.settings
        if st.kind != "classifier":
            raise AttarError(f"teacher store {self.store.folder} holds a {st.kind}'s outputs (per token), not a "
                             "classifier's: an image/table stage reads a store dumped with an image/table teacher.")
        self.num_classes, self.temperature, self.k = st.vocab_size, st.temperature, st.k
        self._values = self._index = self._rest = None
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.store)

    @property
    def folder(self) -> Path:
        return self.store.folder

    @property
    def bytes(self) -> int:
        return self.store.bytes

    @property
    def mode(self) -> str:
        st = self.store.settings
        vals = "float32" if st.values == "f32" else f"step {st.step:g}"
        return (f"stored (top-{st.k} of {st.vocab_size} log-probs, {vals}, T={st.temperature:g}, "
                f"{self.store.bytes_per_position:.1f} B/row; {self.store.folder})")

    def _load(self) -> None:
        if self._values is not None:
            return
        r, _, v, i, t = self.store.positions(np.arange(len(self)))
        if len(r) != len(self) or not np.array_equal(r, np.arange(len(self))):
            raise AttarError(f"teacher store {self.store.folder} does not hold exactly one position per row; it is "
                             "not a classifier store.")
        self._values = torch.from_numpy(v).clamp_min(_LOG_FLOOR).to(self.device)
        self._index = torch.from_numpy(i).long().to(self.device)
        self._rest = torch.from_numpy(t).float().to(self.device)

    def to(self, device: torch.device | str) -> "StoredClassifierTeacher":
        self.device = torch.device(device)
        if self._values is not None:
            self._values, self._index, self._rest = (a.to(self.device) for a in (self._values, self._index, self._rest))
        return self

    def topk(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log-probs [B, k], class ids [B, k], log tail mass [B])`` of rows ``idx`` as stored (ids ascending)."""
        self._load()
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.device)
        return self._values[idx], self._index[idx], self._rest[idx]

    def log_probs(self, idx) -> torch.Tensor:
        """``[B, C]`` float32 log-probabilities of rows ``idx``: the stored top-k, the tail spread evenly over the
        other classes (floored at ``-1e4`` as the in-RAM cache does)."""
        v, ind, rest = self.topk(idx)
        k, c = ind.shape[1], self.num_classes
        if k == c:
            full = torch.empty(len(ind), c, device=v.device)
        else:
            full = (rest - math.log(c - k)).clamp_min(_LOG_FLOOR).unsqueeze(1).expand(len(ind), c).clone()
        return full.scatter_(1, ind, v)

    def logits(self, idx) -> torch.Tensor:
        """``τ·l̂`` ``[B, C]``: what the Trainer's objectives read as the teacher's logits (module doc)."""
        return self.temperature * self.log_probs(idx)

    # ------------------------------------------------------------------------------------------ checks

    def mismatch(self, *, x: torch.Tensor | None = None, num_classes: int | None = None,
                 classes: Sequence[str] | None = None, temperature: float | None = None,
                 teachers: list[nn.Module] | None = None) -> str | None:
        """Why this store does not fit these rows/classes/temperature/teacher, or None."""
        st = self.store.settings
        if num_classes is not None and num_classes != st.vocab_size:
            return f"it holds {st.vocab_size} classes per row, the data has {num_classes}"
        if classes is not None and st.tokenizer and classes_fingerprint(classes) != st.tokenizer:
            return "it was made for another class list (the class names or their order differ)"
        if x is not None:
            if len(x) != st.rows:
                return f"it was made on {st.rows} rows ({st.data or 'data not recorded'}), the training split has {len(x)}"
            h = rows_hash(x)
            if h != st.data_hash:
                return (f"it was made on other rows ({st.data or 'data not recorded'}; rows hash {st.data_hash}, these "
                        f"hash to {h}): the same data spec (name, seed, val_fraction, train_limit) gives the same rows")
        if temperature is not None and st.k < st.vocab_size and float(temperature) != st.temperature:
            return (f"it keeps the top-{st.k} of {st.vocab_size} classes at temperature {st.temperature:g} and the "
                    f"objective softens at {float(temperature):g}: the spread tail is exact only at its own "
                    "temperature (dump with --temperature equal to the objective's, or with every class, --k "
                    f"{st.vocab_size})")
        if teachers is not None and len(teachers) == 1 and model_hash(teachers[0]) != st.teacher_hash:
            return f"it was made with other teacher weights ({st.teacher or 'unnamed'}, hash {st.teacher_hash})"
        return None

    def check(self, **what) -> "StoredClassifierTeacher":
        """:meth:`mismatch` as an error naming the store and the fix; returns self."""
        why = self.mismatch(**what)
        if why:
            raise AttarError(f"teacher store {self.store.folder} does not fit: {why}. {REBUILD_HINT}")
        return self


# ---------------------------------------------------------------------------------------------- relabelling


def relabel_condensed(artifact: str | Path, store: str | Path | TeacherStore | StoredClassifierTeacher,
                      out: str | Path | None = None) -> Path:
    """Give a condensed set's rows soft labels from a store made on that set (``attar teacher dump --data
    '{artifact: DIR}'``): the artifact's ``soft`` field (``[N, C]`` logits, read by ``condense evaluate`` and by
    training on ``{artifact: DIR}``) becomes the store's ``τ·l̂``; its hard labels and images are kept. Written to
    ``out`` (default: the artifact itself, replaced atomically; a stale ``evaluation.json`` beside it goes with
    it). The state records the store (``soft_label_store``) and, when the store's teacher is a model folder, that
    folder as ``soft_label_teacher`` (the teacher evaluate's soft-label control reuses)."""
    from attar.data.artifact import load_synthetic, save_synthetic

    s = load_synthetic(artifact)
    reader = store if isinstance(store, StoredClassifierTeacher) else StoredClassifierTeacher(store)
    classes = s.meta.get("classes")
    c = len(classes) if classes else (s.soft.shape[1] if s.soft is not None else int(s.y.max()) + 1)
    st = reader.store.settings
    why = reader.mismatch(x=s.x, num_classes=c if classes or s.soft is not None else None)
    if why:
        raise AttarError(f"teacher store {reader.folder} cannot relabel the condensed set {artifact}: {why}. Dump "
                         f"the teacher on the condensed set itself: attar teacher dump --model TEACHER --data "
                         f"'{{artifact: {artifact}}}' --out DIR.")
    s.soft = reader.logits(torch.arange(len(s))).float().cpu()
    teacher = Path(st.teacher).expanduser() if st.teacher else None
    s.meta = dict(s.meta, soft_label_store={"folder": str(reader.folder), "teacher": st.teacher,
                                            "teacher_hash": st.teacher_hash, "k": st.k,
                                            "temperature": st.temperature, "values": st.values},
                  soft_label_teacher=str(teacher) if teacher is not None and (teacher / "state.json").exists() else None)
    dest = Path(out) if out is not None else Path(artifact)
    save_synthetic(dest, s, overwrite=True)
    return dest


# ---------------------------------------------------------------------------------------------- a recipe stage


def stage_teacher_store(stage, refs: list, objective, cfg, classes: Sequence[str],
                        x: torch.Tensor | None = None) -> StoredClassifierTeacher:
    """``teacher: {store: DIR}`` of an image/table stage, opened and checked: the only teacher, an objective that
    reads teacher logits (not features), no augmentation (the store saw the plain rows), and a store that fits the
    stage's classes, the objective's temperature and (given ``x``: not during preflight, where ``data: {stage: X}``
    is still X's source) its training rows. Errors name the stage and the fix."""
    where = f"stage {stage.name!r} (teacher: {{store: {refs[0].store}}})"
    if len(refs) != 1 or len(stage.teachers()) != 1:
        raise AttarError(f"{where}: a stored teacher must be the stage's only teacher; for an ensemble, dump the "
                         "teachers together (the store then holds their averaged probabilities).")
    if objective.needs_live_teacher:
        raise AttarError(f"{where}: objective {type(objective).__name__} reads the teacher's features on each batch, "
                         "which a store does not hold; use a live teacher (an earlier stage or a model spec).")
    if cfg.augment and cfg.teacher_cache != "on":
        raise AttarError(f"{where}: train.augment changes the rows each step, but the store holds the teacher's outputs "
                         "on the plain rows; drop augment, or set train.teacher_cache: on to train against them anyway.")
    if cfg.teacher_cache == "off":
        raise AttarError(f"{where}: train.teacher_cache: off asks for a live teacher, but the teacher is a store; "
                         "remove teacher_cache or give a model as the teacher.")
    try:
        reader = StoredClassifierTeacher(refs[0].store)
    except AttarError as e:
        raise AttarError(f"{where}: {e}") from None
    temperature = getattr(getattr(objective, "p", None), "temperature", None)
    why = reader.mismatch(num_classes=len(classes), classes=classes, temperature=temperature, x=x)
    if why:
        raise AttarError(f"{where}: the store does not fit: {why}. {REBUILD_HINT}")
    return reader
