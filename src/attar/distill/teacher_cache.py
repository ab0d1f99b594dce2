"""Teacher outputs computed once and stored compactly, so distillation does not rerun the teacher.

What is stored (per training row, at the cache temperature ``τ``, default 1):

* the teacher's **log-probabilities** ``l = log_softmax(z/τ)``; for an ensemble the log of the
  averaged probabilities ``l = log((1/T) Σ_t softmax(z_t/τ))``;
* ``k = None``: all ``C`` of them in float16; ``k``: the top-k values (float16, sorted) with their
  class indices (int16 when ``C ≤ 32767``, else int32) and, in float32, the log of the leftover
  mass ``r = log(1 − Σ_{top-k} p) = logsumexp`` of the other classes' log-probabilities.

Reconstruction (:meth:`TeacherCache.logits`) returns ``τ·l_full`` with ``l_full`` the stored top-k
log-probs and every other class filled with ``f = log((1 − Σ_i exp l_i)/(C − k)) = r − log(C − k)``.
Why this fill: the ``C − k`` filled classes then carry ``(C − k)·e^f = 1 − Σ_i p_i``, so
``Σ_c exp l_full = 1``: the vector is already normalised, ``softmax(τ·l_full/τ) = exp l_full`` keeps
the top-k probabilities exactly (up to float16 rounding) and spreads the leftover mass uniformly.
``r`` is computed at build time in full precision instead of from the rounded float16 values,
because ``1 − Σ`` of rounded values loses all precision when the top-k mass is close to 1.
Log-probabilities below ``-1e4`` (probability 0 in float32) are stored as ``-1e4``.

Temperature: the cache returns ``τ·l``, so an objective softening at its own temperature ``T``
sees ``softmax(τ·l/T)``. For ``k = None`` and a single teacher this is exact at every ``T``
(``τ·l`` is the teacher's logits shifted per row, which softmax ignores). For an ensemble (the
average is taken at ``τ``) or top-k (the uniform fill is made at ``τ``) it is exact at ``T = τ``
only: build the cache with ``temperature`` equal to the objective's temperature. Otherwise
temperature is applied to the log-probabilities, i.e. ``softmax(l·τ/T) ∝ p_τ^(τ/T)``.

Caching is valid only when the student sees the same inputs the teacher saw, e.g. no
augmentation; it records the teachers' and the data's hashes so a stale cache is detected.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from attar.checkpoint import atomic_save_safetensors, load_safetensors
from attar.errors import AttarError
from attar.train.progress import StepProgress

FORMAT = "attar-teacher-cache/1"
_LOG_FLOOR = -1e4

ProgressFn = Callable[[int, int], None]


def tensor_hash(*tensors: torch.Tensor) -> str:
    """sha256 (16 hex digits) of tensors' dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_hash(model: nn.Module) -> str:
    """sha256 (16 hex digits) of a model's state dict: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_hash(t).encode())
    return h.hexdigest()[:16]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def teacher_log_probs(teachers: list[nn.Module], x: torch.Tensor, batch_size: int = 1024,
                      temperature: float = 1.0) -> Iterator[tuple[int, torch.Tensor]]:
    """The teacher pass: ``(start, l)`` per batch of ``x``, ``l = log_softmax(z/τ)`` float32 on the CPU (an
    ensemble: the log of the averaged probabilities). Teachers run in eval and inference mode and get their own
    training flags back. Shared by :meth:`TeacherCache.build` and the stored-output dump
    (:mod:`attar.distill.cls_store`), so both see the same numbers."""
    modes = [t.training for t in teachers]
    num_classes = None
    try:
        for t in teachers:
            t.eval()
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            logps = []
            with torch.inference_mode():
                for ti, t in enumerate(teachers):
                    z = t(xb.to(_device_of(t))).float().cpu()
                    if z.dim() != 2 or (num_classes is not None and z.shape[1] != num_classes):
                        raise AttarError(
                            f"TeacherCache.build: teacher {ti} returned logits of shape {tuple(z.shape)}; "
                            f"every teacher must return [batch, {num_classes or 'classes'}]."
                        )
                    num_classes = z.shape[1]
                    logps.append(torch.log_softmax(z / temperature, dim=-1))
                logp = logps[0] if len(logps) == 1 else torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))
            yield start, logp.clone()  # cloned outside inference mode: an ordinary tensor the caller may use anywhere
    finally:
        for t, m in zip(teachers, modes):
            t.train(m)


class TeacherCache:
    """Teacher log-probabilities for every training row; ``logits(idx)`` gives ``[B, C]`` float32."""

    def __init__(
        self,
        values: torch.Tensor,
        index: torch.Tensor | None,
        rest: torch.Tensor | None,
        num_classes: int,
        temperature: float = 1.0,
        teacher_hashes: list[str] | None = None,
        data_hash: str | None = None,
    ):
        self.values = values
        self.index = index
        self.rest = rest
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.teacher_hashes = list(teacher_hashes or [])
        self.data_hash = data_hash

    # ---------------------------------------------------------------- properties
    @property
    def k(self) -> int | None:
        """Classes kept per row (None: all, stored densely)."""
        return None if self.index is None else int(self.index.shape[1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def bytes(self) -> int:
        """Memory held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.index, self.rest) if t is not None)

    @property
    def full_bytes(self) -> int:
        """What float32 logits for every row and class would take (for comparison)."""
        return len(self) * self.num_classes * 4

    @property
    def mode(self) -> str:
        n_t = len(self.teacher_hashes) or 1
        who = "1 teacher" if n_t == 1 else f"ensemble of {n_t} (averaged probabilities)"
        what = "full fp16 log-probs" if self.k is None else f"top-{self.k} of {self.num_classes} fp16 log-probs"
        return (
            f"cached ({what}, {who}, T={self.temperature:g}, {_fmt_bytes(self.bytes)} vs "
            f"{_fmt_bytes(self.full_bytes)} as fp32 logits)"
        )

    def to(self, device: torch.device | str) -> "TeacherCache":
        self.values = self.values.to(device)
        self.index = None if self.index is None else self.index.to(device)
        self.rest = None if self.rest is None else self.rest.to(device)
        return self

    # ---------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        teachers: list[nn.Module],
        x: torch.Tensor,
        k: int | None = None,
        batch_size: int = 1024,
        temperature: float = 1.0,
        progress: ProgressFn | None = None,
    ) -> "TeacherCache":
        """Run every teacher once over ``x`` (eval mode, inference mode) and keep its log-probs."""
        if not teachers:
            raise AttarError("TeacherCache.build needs at least one teacher model.")
        if len(x) == 0:
            raise AttarError("TeacherCache.build got an empty input tensor x.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise AttarError(f"TeacherCache.build: temperature must be a positive number, got {temperature!r}.")
        if k is not None and k < 1:
            raise AttarError(f"TeacherCache.build: k must be None (all classes) or >= 1, got {k!r}.")
        n = len(x)
        values = index = rest = None
        num_classes = None
        bar = StepProgress(f"teacher pass ({len(teachers)} teacher{'s' if len(teachers) > 1 else ''})", n, unit="rows")
        with bar:
            for start, logp in teacher_log_probs(teachers, x, batch_size, temperature):
                c = logp.shape[1]
                if values is None:
                    num_classes = c
                    if k is not None and k > c:
                        raise AttarError(f"TeacherCache.build: k={k} exceeds the {c} classes the teachers predict.")
                    width = c if k is None else k
                    values = torch.empty(n, width, dtype=torch.float16)
                    if k is not None:
                        index = torch.empty(n, k, dtype=torch.int16 if c <= 32767 else torch.int32)
                        rest = torch.empty(n, dtype=torch.float32)
                sl = slice(start, start + len(logp))
                if k is None:
                    values[sl] = logp.clamp_min(_LOG_FLOOR).half()
                else:
                    top, ind = logp.topk(k, dim=-1)
                    values[sl] = top.clamp_min(_LOG_FLOOR).half()
                    index[sl] = ind.to(index.dtype)
                    others = logp.scatter(1, ind, float("-inf"))
                    rest[sl] = torch.logsumexp(others, dim=-1).clamp_min(_LOG_FLOOR)
                bar.update(len(logp))
                if progress is not None:
                    progress(min(start + batch_size, n), n)
        return cls(values, index, rest, num_classes, temperature, [model_hash(t) for t in teachers], tensor_hash(x))

    # ---------------------------------------------------------------- read
    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` float32 ``τ·l_full`` for rows ``idx`` (see the module doc for the fill value)."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.values.device)
        v = self.values[idx].float()
        if self.index is None:
            return self.temperature * v
        ind = self.index[idx].long()
        k, c = ind.shape[1], self.num_classes
        if k == c:
            full = torch.empty(len(idx), c, device=v.device).scatter_(1, ind, v)
        else:
            fill = (self.rest[idx] - math.log(c - k)).unsqueeze(1)
            full = fill.expand(len(idx), c).clone().scatter_(1, ind, v)
        return self.temperature * full

    # ---------------------------------------------------------------- checks
    def mismatch(self, teachers: list[nn.Module] | None = None, x: torch.Tensor | None = None,
                 k: int | None | str = "any", temperature: float | None = None) -> str | None:
        """Why this cache does not fit these teachers/data/settings, or None if it does."""
        if teachers is not None:
            hashes = [model_hash(t) for t in teachers]
            if hashes != self.teacher_hashes:
                return f"teacher weights differ (cache {self.teacher_hashes}, now {hashes})"
        if x is not None:
            if len(x) != len(self):
                return f"the cache has {len(self)} rows but the data has {len(x)}"
            if self.data_hash is not None and tensor_hash(x) != self.data_hash:
                return "the training inputs differ from those the cache was built on"
        if k != "any" and k != self.k:
            return f"the cache keeps k={self.k} classes, {k} requested"
        if temperature is not None and float(temperature) != self.temperature:
            return f"the cache was built at temperature {self.temperature:g}, {temperature:g} requested"
        return None

    # ---------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> str:
        """Write atomically as safetensors with metadata; returns the file's sha256."""
        tensors = {"values": self.values}
        if self.index is not None:
            tensors["index"] = self.index
            tensors["rest"] = self.rest
        meta = {
            "format": FORMAT,
            "k": "" if self.k is None else str(self.k),
            "num_classes": str(self.num_classes),
            "n": str(len(self)),
            "temperature": repr(self.temperature),
            "teachers": json.dumps(self.teacher_hashes),
            "data_hash": self.data_hash or "",
        }
        return atomic_save_safetensors(tensors, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, teachers: list[nn.Module] | None = None,
             x: torch.Tensor | None = None) -> "TeacherCache":
        """Load a cache; with ``teachers``/``x`` given, refuse one built for other weights or data."""
        from safetensors import safe_open

        path = Path(path)
        tensors = load_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "values" not in tensors:
            raise AttarError(f"{path} is not an attar teacher cache (format {meta.get('format')!r}); rebuild it.")
        cache = cls(
            tensors["values"], tensors.get("index"), tensors.get("rest"), int(meta["num_classes"]),
            float(meta["temperature"]), json.loads(meta["teachers"]), meta.get("data_hash") or None,
        )
        why = cache.mismatch(teachers, x)
        if why:
            raise AttarError(f"teacher cache {path} does not fit: {why}. Delete it to rebuild.")
        return cache

    @classmethod
    def load_or_build(cls, path: str | Path, teachers: list[nn.Module], x: torch.Tensor, k: int | None = None,
                      batch_size: int = 1024, temperature: float = 1.0,
                      progress: ProgressFn | None = None) -> tuple["TeacherCache", bool]:
        """Reuse the cache at ``path`` when it matches exactly; else build and save one. Returns (cache, built)."""
        path = Path(path)
        if path.exists():
            try:
                cache = cls.load(path)
            except AttarError:
                cache = None
            if cache is not None and cache.mismatch(teachers, x, k, temperature) is None:
                return cache, False
        cache = cls.build(teachers, x, k=k, batch_size=batch_size, temperature=temperature, progress=progress)
        cache.save(path)
        return cache, True
