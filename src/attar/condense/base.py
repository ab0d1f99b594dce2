"""What every condensation method shares: parameters, the real data grouped by class, fresh networks,
synthetic-set initialisation and the checks made before any work starts.

A method is a :class:`Condenser` subclass registered in :data:`CONDENSERS` (one file per method).
It declares a strict pydantic ``Params`` model (unknown or mistyped fields fail listing the accepted
ones) and implements :meth:`Condenser.run`, which returns the synthetic images, labels and any
extras. Per-class work is batched over classes: real rows are kept in a padded ``[C, n_max]`` index
table, so drawing ``B`` rows of every class is one ``topk`` over random keys, and synthetic images
are held as ``[C, ipc, ...]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from attar.models import build_model
from attar.registry import Params as _Params
from attar.registry import Registry, validation_error
from attar.rng import generator as gen  # noqa: F401  (the condensers import gen from here)
from attar.rng import seed_of
from attar.specs import CONDENSE_MODEL, ModelSpec

CONDENSERS: Registry[type["Condenser"]] = Registry("condensation method")

DEFAULT_MODEL = CONDENSE_MODEL


class Params(_Params):
    """Base of every condensation method's ``Params`` (strict: unknown fields and NaN/Inf refused)."""


class ClassIndex:
    """Labeled rows grouped by class in a padded ``[C, n_max]`` table (``-1`` pads), for batched draws."""

    def __init__(self, y: torch.Tensor, num_classes: int):
        self.num_classes = num_classes
        self.counts = torch.bincount(y[y >= 0], minlength=num_classes)
        n_max = int(self.counts.max()) if len(self.counts) else 0
        order = torch.argsort(torch.where(y >= 0, y, num_classes), stable=True)
        order = order[: int(self.counts.sum())]
        starts = torch.cumsum(self.counts, 0) - self.counts
        pos = torch.arange(len(order)) - starts.repeat_interleave(self.counts)
        table = torch.full((num_classes, max(1, n_max)), -1, dtype=torch.long)
        table[y[order], pos] = order
        self.table = table

    @property
    def valid(self) -> torch.Tensor:
        return self.table >= 0

    def draw(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """``[C, k]`` row indices: ``k`` distinct rows of every class (all of a class when it has fewer: cycled)."""
        keys = torch.rand(self.table.shape, generator=generator)
        keys = keys.masked_fill(~self.valid, -1.0)
        kk = min(k, self.table.shape[1])
        pick = keys.topk(kk, dim=1).indices
        rows = self.table.gather(1, pick)
        if (rows < 0).any() or kk < k:
            # A class with fewer than k rows: cycle its own rows (rare; only tiny data sets).
            pos = torch.arange(k)[None, :] % self.counts.clamp_min(1)[:, None]
            perm = keys.argsort(dim=1, descending=True)
            rows = self.table.gather(1, perm.gather(1, pos))
        return rows


@dataclass
class CondenseContext:
    """Everything a method needs, prepared and validated by :func:`attar.condense.condense`."""

    x: torch.Tensor  # real training images [N, C, H, W], [0, 1] scale
    y: torch.Tensor  # int64 [N], -1 = unlabeled (ignored)
    num_classes: int
    ipc: int
    iterations: int
    seed: int
    model: ModelSpec
    mean: torch.Tensor
    std: torch.Tensor
    init: str = "real"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    on_step: Callable[[int, dict[str, float]], None] | None = None
    #: FYI plug-in (flip-aware synthesis): matching losses see every synthetic image and its horizontal flip
    flip: bool = False
    #: the source data set's name and :func:`~attar.data.artifact.data_hash` ("" when unknown; MTT's
    #: expert store records them, computing the hash itself when it is not given)
    data_name: str = ""
    data_hash: str = ""
    #: ZCA plug-in: a fitted :class:`attar.condense.zca.ZCA` when ``x`` is in ZCA space (mean 0, std 1), else None
    zca: Any = None
    #: wall-time budget: ``time.monotonic()`` by which the loop must end (None: none); see :meth:`keep_going`
    deadline: float | None = None
    index: ClassIndex = field(init=False)
    #: iterations finished so far (set by :meth:`step`); ``stopped_by_budget`` once :meth:`keep_going` said no
    done: int = field(init=False, default=0)
    stopped_by_budget: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.index = ClassIndex(self.y, self.num_classes)
        self.loop_started: float | None = None

    def keep_going(self, it: int) -> bool:
        """Whether iteration ``it`` should run: always the first; later ones only while the next one fits in
        the wall-time budget, judged by the mean time of those done (so the run ends within the budget)."""
        now = time.monotonic()
        if it == 0 or self.loop_started is None:
            self.loop_started = now
            return True
        if self.deadline is None:
            return True
        per = (now - self.loop_started) / max(1, it)
        if now + per > self.deadline:
            self.stopped_by_budget = True
            return False
        return True

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def labels(self) -> torch.Tensor:
        """Synthetic labels in class-major order: ``[0]*ipc + [1]*ipc + ...``."""
        return torch.arange(self.num_classes).repeat_interleave(self.ipc)

    def fresh_model(self, *parts: Any) -> nn.Module:
        """A freshly initialised network of the context's architecture, seeded by ``(seed, *parts)``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(self.seed, "net", *parts))
            m = build_model(self.model, self.input_shape, self.num_classes, self.mean, self.std)
        return m.to(self.device)

    def real_batch(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` real images of every class as ``[C*k, ...]`` (class-major) and their row indices ``[C, k]``."""
        rows = self.index.draw(k, generator)
        return self.x[rows.flatten()].to(self.device), rows

    def init_images(self, generator: torch.Generator) -> torch.Tensor:
        """Initial synthetic images ``[C*ipc, ...]``: real samples of each class, or noise with the data's statistics."""
        if self.init == "real":
            return self.real_batch(self.ipc, generator)[0].clone()
        shape = (self.num_classes * self.ipc, *self.input_shape)
        noise = torch.randn(shape, generator=generator)
        return (noise * self.std + self.mean).to(self.device)

    def flip_aware(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """FYI: with ``flip`` on, the class-major synthetic rows ``x`` [C·k, ...] and their horizontal flips as one
        class-major set [C·2k, ...] (each class: its k images, then their k mirror images), with ``y`` (labels or
        soft-label rows, class-major) repeated to match; unchanged when ``flip`` is off or the data are not images."""
        if not self.flip or x.dim() != 4:
            return x, y
        c = self.num_classes
        xc = x.reshape(c, -1, *x.shape[1:])
        x2 = torch.cat([xc, xc.flip(-1)], 1).reshape(-1, *x.shape[1:])
        if y is None:
            return x2, None
        yc = y.reshape(c, -1, *y.shape[1:])
        return x2, torch.cat([yc, yc], 1).reshape(-1, *y.shape[1:])

    def step(self, i: int, **metrics: float) -> None:
        self.done = i + 1
        if self.on_step is not None:
            self.on_step(i, metrics)


@dataclass
class CondenseOutput:
    x: torch.Tensor
    y: torch.Tensor
    soft: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Condenser:
    """Base class; subclasses set ``name`` (by registration), ``Params`` and ``run``."""

    name: ClassVar[str] = ""
    #: True when the method optimises pixels (it then needs ``iterations``); False for subset selection.
    learns_images: ClassVar[bool] = False
    #: default number of outer iterations when the caller gives none
    default_iterations: ClassVar[int] = 0
    summary: ClassVar[str] = ""

    class Params(Params):
        pass

    def __init__(self, params: dict[str, Any] | BaseModel | None = None):
        """``params``: validated ``Params`` (``CONDENSERS.build({"name": ..., **params})``) or a plain mapping."""
        if isinstance(params, BaseModel):
            self.p = params
            return
        try:
            self.p = self.Params.model_validate(params or {})
        except ValidationError as e:
            raise validation_error(f"condensation method {self.name!r}", e, self.Params) from None

    def preflight(self, *, model: ModelSpec, data_name: str, data_hash: str, input_shape: tuple[int, ...],
                  num_classes: int, zca_eps: float | None) -> None:
        """Checks that need the data's identity, made before any work (e.g. MTT's expert store); default: none."""

    def run(self, ctx: CondenseContext) -> CondenseOutput:  # pragma: no cover - abstract
        raise NotImplementedError


register = CONDENSERS.named  # ``@register("dm")``: the class is listed under, and knows, its name


def standardise(ctx: CondenseContext) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """``to_z``/``from_z``: synthetic images are optimised in standardised pixel units (as the reference code),
    so learning rates mean the same on every data set; they are stored back in [0, 1] scale."""
    m, s = ctx.mean.to(ctx.device), ctx.std.to(ctx.device)
    return (lambda x: (x - m) / s), (lambda z: z * s + m)


def embed_fn(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The penultimate vector of an attar model (``model.embed``), else the output."""
    return getattr(model, "embed", model)
