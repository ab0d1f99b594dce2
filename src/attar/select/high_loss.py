"""High-loss mini-batches (Sahayam et al., "Can we learn better with hard samples?", 2023).

Each step draws ``δ`` candidate mini-batches, scores them with one no-grad forward pass of the current
model, and trains on the hardest. Two variants:

* ``level: batch`` (default; the paper's unit): the candidates are split into ``δ = round(1 / keep)``
  mini-batches of ``batch_size`` rows and the one with the highest mean cross-entropy is trained on, as a
  whole. Effective keep is ``1 / δ`` (so ``keep: 0.3`` means ``δ = 3``, i.e. a third of the candidates).
* ``level: row``: ``ceil(batch_size / keep)`` candidate rows, the ``batch_size`` highest-loss rows are
  trained on (the row-level "max-loss" selection of Loshchilov & Hutter 2015 / selective backprop).

Costs per step: one forward (no grad) over all candidates; counted in ``scoring_forward_rows``.
Rows without a label (``-1``) have no loss: they score lowest, so they are trained on only if nothing
else is left.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.train.objective import Batch
from attar.select.base import SELECTORS, Selector, SelectorParams


def per_row_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per row in float32; ``-inf`` for unlabeled rows (``y < 0``)."""
    ce = F.cross_entropy(logits.float(), y.clamp(min=0), reduction="none")
    return torch.where(y >= 0, ce, torch.full_like(ce, float("-inf")))


class HighLossParams(SelectorParams):
    keep: float = Field(0.5, gt=0, le=1, description="fraction of candidate rows trained on (1/δ for level=batch)")
    level: Literal["batch", "row"] = Field("batch", description="keep the hardest whole mini-batch, or the hardest rows")


@SELECTORS.register("high_loss")
class HighLoss(Selector):
    """Train on the highest-loss candidate mini-batch (or rows) out of ``δ = 1/keep``."""

    Params = HighLossParams
    scores_with_model = True

    def delta(self) -> int:
        return max(1, round(1 / self.p.keep))

    def candidates(self, batch_size: int) -> int:
        if self.p.level == "batch":
            return batch_size * self.delta()
        return max(batch_size, math.ceil(batch_size / self.p.keep))

    def select(self, batch: Batch, logits: torch.Tensor | None, keep_n: int) -> torch.Tensor:
        assert logits is not None
        loss = per_row_ce(logits, batch.y)
        n = len(loss)
        if keep_n >= n:
            return torch.arange(n)
        if self.p.level == "row":
            return torch.topk(loss, keep_n, sorted=False).indices.sort().values
        chunks = n // keep_n
        lab = torch.isfinite(loss[: chunks * keep_n]).view(chunks, keep_n)
        total = torch.where(lab, loss[: chunks * keep_n].view(chunks, keep_n), 0.0).sum(1)
        mean = total / lab.sum(1).clamp(min=1)
        mean = torch.where(lab.any(1), mean, torch.full_like(mean, float("-inf")))
        best = int(torch.argmax(mean))
        return torch.arange(best * keep_n, (best + 1) * keep_n)
