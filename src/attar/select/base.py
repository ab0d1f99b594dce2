"""The selector interface: how the trainer asks which rows to train on.

Two hooks cover the families in scope: ``epoch_rows`` reshapes an epoch's row order
(RS2 draws a fresh random fraction each epoch; static pruning keeps a scored subset)
and ``select`` keeps part of an over-drawn candidate batch (online batch selection:
high-loss, UDS, teacher-student disagreement). Every selector accounts for what it
spent, so comparisons can be made at matched compute.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from attar.errors import AttarError
from attar.train.objective import Batch
from attar.registry import Params, Registry

SELECTORS: Registry[type["Selector"]] = Registry("selector")


class SelectorParams(Params):
    keep: float = Field(1.0, gt=0, le=1, description="fraction of candidate rows (or of the epoch) trained on")


class Selector:
    """Base class: uniform selection (every row, in the shuffled order)."""

    Params = SelectorParams
    #: True when ``select`` needs the model's outputs on the candidates (one extra forward, no backward).
    scores_with_model = False
    #: On CPU the scoring forward runs in chunks of this many rows (eval mode: same outputs, faster).
    score_chunk = 256

    def __init__(self, params: SelectorParams):
        self.p = params
        #: What selection cost. ``select_seconds`` is the whole wall time spent in selection (scoring forward
        #: included); ``score_seconds`` the scoring forward alone; ``candidate_rows`` rows drawn; ``trained_rows``
        #: rows handed to the training step; ``scoring_forward_rows`` rows run through a no-grad scoring forward.
        self.stats: dict[str, float] = {"scoring_forward_rows": 0, "select_seconds": 0.0, "score_seconds": 0.0,
                                        "candidate_rows": 0, "trained_rows": 0}
        # Filled by setup(): where training stands, for selectors that change over training.
        self.seed = 0
        self.epochs = 1
        self.micro_per_epoch = 1
        self.epoch = 0
        self.micro = 0

    # -- hooks -----------------------------------------------------------------------------
    def check(self, *, stage: Any = None, objective: Any = None, input_shape: tuple[int, ...] | None = None,
              labels: torch.Tensor | None = None) -> None:
        """Cheap checks before any training starts (recipe preflight): raise :class:`AttarError` when the
        selector cannot work on this stage. ``stage`` is the recipe's StageSpec, ``objective`` the built
        objective, ``input_shape`` one training row's shape, ``labels`` the training labels (``-1`` =
        unlabeled). Any of them may be missing; check only what is given. Nothing to check by default."""

    def spec(self) -> dict[str, Any]:
        """The selector as a recipe writes it (name and every parameter, defaults included): what a
        checkpoint's config hash covers, so a resume with a different selector is refused."""
        return {"name": self.name, **self.p.model_dump(mode="json")}

    @property
    def name(self) -> str:
        return next((n for n in SELECTORS.names() if SELECTORS.get(n) is type(self)), type(self).__name__)

    def setup(self, trainer: Any) -> None:
        """Called once by the trainer at construction (before any resume loads state). Gives the selector
        the training rows (``trainer.x``, ``trainer.y``), the model, the seed and the schedule length.
        Subclasses that override it call ``super().setup(trainer)``."""
        self.seed = int(trainer.seed)
        self.epochs = int(trainer.cfg.epochs)
        self.micro_per_epoch = int(trainer.steps_per_epoch * trainer.accumulate)  # 1 for strategies that do not accumulate (MeZO)

    def begin_micro(self, epoch: int, micro: int) -> None:
        """Called before each micro-batch is drawn: the position in training (resume-exact, no state)."""
        self.epoch, self.micro = epoch, micro

    def progress(self) -> float:
        """Fraction of training done at the current micro-batch, in [0, 1)."""
        return (self.epoch * self.micro_per_epoch + self.micro) / max(1, self.epochs * self.micro_per_epoch)

    def epoch_rows(self, order: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """The rows (in order) this epoch iterates over."""
        return order

    def candidates(self, batch_size: int) -> int:
        """How many rows to draw per step so that ``batch_size`` remain after ``select``."""
        return batch_size

    def select(self, batch: Batch, logits: torch.Tensor | None, keep_n: int) -> torch.Tensor:
        """Positions (within the batch) of the rows to train on."""
        return torch.arange(len(batch.y))

    def transform(self, batch: Batch) -> Batch:
        """Change the kept rows' inputs before training (curricula); the identity by default."""
        return batch

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (e.g. a memory buffer), so resume stays exact."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned."""

    # -- used by the trainer ---------------------------------------------------------------
    def rows_per_epoch(self, n: int) -> int:
        return n

    def score(self, batch: Batch, model: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The model's logits on the candidates: one no-grad forward in eval mode (no dropout, no
        batch-norm statistics updated), counted in ``scoring_forward_rows`` and ``score_seconds``."""
        t0 = time.perf_counter()
        was = model.training if isinstance(model, nn.Module) else None
        if was:
            model.eval()
        try:
            with torch.no_grad():
                x, c = batch.x, self.score_chunk
                # On CPU, large batches fall out of cache: chunks of a few hundred rows run ~2x faster.
                logits = model(x) if x.device.type != "cpu" or len(x) <= c else \
                    torch.cat([model(x[i : i + c]) for i in range(0, len(x), c)])
        finally:
            if was:
                model.train()
        self.stats["scoring_forward_rows"] += len(batch.y)
        self.stats["score_seconds"] += time.perf_counter() - t0
        return logits

    def timed_select(self, batch: Batch, score: Callable[[torch.Tensor], torch.Tensor], keep_n: int) -> Batch:
        t0 = time.perf_counter()
        logits = self.score(batch, score) if self.scores_with_model else None
        self.stats["candidate_rows"] += len(batch.y)
        pos = self.select(batch, logits, keep_n)
        if len(pos) != len(batch.y):
            batch = Batch(x=batch.x[pos], y=batch.y[pos], idx=batch.idx[pos],
                          teacher_logits=None if batch.teacher_logits is None else batch.teacher_logits[..., pos, :])
        batch = self.transform(batch)
        self.stats["trained_rows"] += len(batch.y)
        self.stats["select_seconds"] += time.perf_counter() - t0
        return batch


@SELECTORS.register("uniform")
class Uniform(Selector):
    """The baseline: every row, shuffled; ``keep`` < 1 trains on a fixed fraction of each epoch's order."""

    def epoch_rows(self, order, epoch, generator):
        return order[: max(1, math.ceil(self.p.keep * len(order)))]

    def rows_per_epoch(self, n: int) -> int:
        return max(1, math.ceil(self.p.keep * n))


def build_selector(spec: dict[str, Any] | None) -> Selector | None:
    """A selector from its recipe spec ``{name: ..., keep: ..., ...}`` (``SELECTORS.build``); ``None`` for no
    spec. An unknown ``name`` lists the registered selectors, a bad or unknown parameter the accepted fields."""
    return SELECTORS.build(spec) if spec else None


def check_selector(selector: Selector | None, *, stage: Any = None, objective: Any = None,
                   input_shape: tuple[int, ...] | None = None, labels: torch.Tensor | None = None,
                   where: str = "selector") -> None:
    """Run ``selector.check`` with what a recipe preflight knows (stage, objective, input shape, training
    labels), prefixing errors with ``where`` (e.g. ``stage 'student' (stages[1].selector)``)."""
    if selector is None:
        return
    try:
        selector.check(stage=stage, objective=objective, input_shape=None if input_shape is None else tuple(input_shape),
                       labels=labels)
    except AttarError as e:
        raise AttarError(f"{where}: {e}") from None


def selector_spec_hash(spec: dict[str, Any] | None) -> str | None:
    """A stable short hash of a selector spec with its defaults filled in (``None`` without a selector), so
    ``{name: uds}`` and ``{name: uds, keep: 0.5}`` hash alike. For cache keys over stage settings."""
    sel = build_selector(spec)
    if sel is None:
        return None
    return hashlib.sha256(json.dumps(sel.spec(), sort_keys=True).encode()).hexdigest()[:16]


def quotas(counts: torch.Tensor, k: int) -> torch.Tensor:
    """Per-class quotas proportional to ``counts`` that add up to exactly ``k`` (largest remainder)."""
    exact = counts.double() * k / counts.sum()
    q = exact.floor().long()
    short = k - int(q.sum())
    if short > 0:
        q[torch.argsort(exact - q, descending=True, stable=True)[:short]] += 1
    return q


def balanced_top(key: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` rows with the largest ``key``, taking each class's quota from its own best rows."""
    classes, cls = torch.unique(y, return_inverse=True)
    q = quotas(torch.bincount(cls, minlength=len(classes)), k)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(cls[order], stable=True)]  # grouped by class, best first within each class
    starts = torch.cumsum(torch.bincount(cls, minlength=len(classes)), 0) - torch.bincount(cls, minlength=len(classes))
    rank = torch.arange(len(key)) - starts[cls[order]]
    return order[rank < q[cls[order]]]

class FixedSubset(Selector):
    """A selector that keeps one scored subset of the rows for the whole stage: the ``keep`` fraction with the
    largest :meth:`rank_key` (per class when ``balanced``), chosen once on the first epoch, drawn every epoch and
    checkpointed, so a resumed run keeps the same subset. Subclasses give the key (and the labels for balance)."""

    def __init__(self, params: SelectorParams):
        super().__init__(params)
        self.kept: torch.Tensor | None = None  # bool mask over training rows
        self.row_scores: torch.Tensor | None = None

    def rank_key(self, n: int) -> torch.Tensor:  # pragma: no cover
        """A float64 key per row: the rows with the largest are kept."""
        raise NotImplementedError

    def balance_labels(self) -> torch.Tensor | None:
        """The labels each class's quota is taken by (with ``balanced``)."""
        return None

    def rows_per_epoch(self, n: int) -> int:
        return max(1, math.ceil(self.p.keep * n))

    def compute_kept(self, n: int) -> torch.Tensor:
        t0 = time.perf_counter()
        key, k = self.rank_key(n), self.rows_per_epoch(n)
        kept = torch.zeros(n, dtype=torch.bool)
        labels = self.balance_labels() if getattr(self.p, "balanced", False) else None
        if labels is not None:
            kept[balanced_top(key, labels.cpu(), k)] = True
        else:
            kept[torch.topk(key, k).indices] = True
        self.stats["select_seconds"] += time.perf_counter() - t0
        return kept

    def epoch_rows(self, order: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        if self.kept is None or len(self.kept) != len(order):
            self.kept = self.compute_kept(len(order))
        return order[self.kept[order]]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.kept is None else {"kept": self.kept.to(torch.uint8)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "kept" in tensors:
            self.kept = tensors["kept"].bool()
