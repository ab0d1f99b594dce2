"""The selector interface: how the trainer asks which rows to train on.

Two hooks cover the families in scope: ``epoch_rows`` reshapes an epoch's row order
(RS2 draws a fresh random fraction each epoch; static pruning keeps a scored subset)
and ``select`` keeps part of an over-drawn candidate batch (online batch selection:
high-loss, UDS, teacher-student disagreement). Every selector accounts for what it
spent, so comparisons can be made at matched compute.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attar.errors import AttarError
from attar.objective import Batch
from attar.registry import Registry

SELECTORS: Registry[type["Selector"]] = Registry("selector")


class SelectorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keep: float = Field(1.0, gt=0, le=1, description="fraction of candidate rows (or of the epoch) trained on")


class Selector:
    """Base class: uniform selection (every row, in the shuffled order)."""

    Params = SelectorParams
    #: True when ``select`` needs the model's outputs on the candidates (one extra forward, no backward).
    scores_with_model = False

    def __init__(self, params: SelectorParams):
        self.p = params
        self.stats: dict[str, float] = {"scoring_forward_rows": 0, "select_seconds": 0.0, "candidate_rows": 0}

    # -- hooks -----------------------------------------------------------------------------
    def epoch_rows(self, order: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """The rows (in order) this epoch iterates over."""
        return order

    def candidates(self, batch_size: int) -> int:
        """How many rows to draw per step so that ``batch_size`` remain after ``select``."""
        return batch_size

    def select(self, batch: Batch, logits: torch.Tensor | None, keep_n: int) -> torch.Tensor:
        """Positions (within the batch) of the rows to train on."""
        return torch.arange(len(batch.y))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (e.g. a memory buffer), so resume stays exact."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned."""

    # -- used by the trainer ---------------------------------------------------------------
    def rows_per_epoch(self, n: int) -> int:
        return n

    def timed_select(self, batch: Batch, score: Callable[[torch.Tensor], torch.Tensor], keep_n: int) -> Batch:
        t0 = time.perf_counter()
        logits = None
        if self.scores_with_model:
            with torch.no_grad():
                logits = score(batch.x)
            self.stats["scoring_forward_rows"] += len(batch.y)
        self.stats["candidate_rows"] += len(batch.y)
        pos = self.select(batch, logits, keep_n)
        self.stats["select_seconds"] += time.perf_counter() - t0
        if len(pos) == len(batch.y):
            return batch
        return Batch(x=batch.x[pos], y=batch.y[pos], idx=batch.idx[pos],
                     teacher_logits=None if batch.teacher_logits is None else batch.teacher_logits[..., pos, :])


@SELECTORS.register("uniform")
class Uniform(Selector):
    """The baseline: every row, shuffled; ``keep`` < 1 trains on a fixed fraction of each epoch's order."""

    def epoch_rows(self, order, epoch, generator):
        return order[: max(1, math.ceil(self.p.keep * len(order)))]

    def rows_per_epoch(self, n: int) -> int:
        return max(1, math.ceil(self.p.keep * n))


def build_selector(spec: dict[str, Any] | None) -> Selector | None:
    if not spec:
        return None
    if "name" not in spec:
        raise AttarError(f"a selector needs a 'name'; known selectors: {', '.join(SELECTORS.names())}.")
    cls = SELECTORS.get(spec["name"])
    try:
        params = cls.Params.model_validate({k: v for k, v in spec.items() if k != "name"})
    except ValidationError as e:
        fields = ", ".join(cls.Params.model_fields)
        msgs = "; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors())
        raise AttarError(f"selector {spec['name']!r}: {msgs}. Accepted fields: {fields}.") from None
    return cls(params)
