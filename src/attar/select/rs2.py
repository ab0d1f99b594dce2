"""RS2: repeated random sampling (Okanovic et al., "Repeated Random Sampling for Minimizing the
Time-to-Accuracy of Learning"), the variant *without replacement across epochs*.

Each epoch trains on a fresh random ``keep`` fraction of the training rows (``k = ceil(keep * n)``).
The rows come from one random permutation per *round* of ``floor(n / k)`` epochs, taken in consecutive
chunks of ``k``: within a round no row is seen twice and, when ``keep`` divides 1, every row is seen
exactly once per round. The ``n - k * floor(n / k)`` rows left over are skipped in that round; the next
round draws a new permutation. The learning-rate schedule follows the trainer's step count, so it is
compressed to the reduced budget automatically, as RS2 prescribes.

Compared with ``uniform`` at the same ``keep`` (a prefix of each epoch's freshly shuffled order, i.e.
with replacement across epochs), RS2 guarantees coverage: over ``1 / keep`` epochs it touches every row.
Selection cost: one ``randperm(n)`` per epoch, nothing per step.
"""

from __future__ import annotations

import math
import time

import torch

from attar.select.base import SELECTORS, Selector, SelectorParams
from attar.rng import generator as generator_for


@SELECTORS.register("rs2")
class RS2(Selector):
    """A fresh random ``keep`` fraction of the data each epoch, without replacement across epochs."""

    Params = SelectorParams

    def _chunk(self, n: int) -> tuple[int, int]:
        k = max(1, math.ceil(self.p.keep * n))
        return k, max(1, n // k)

    def rows_per_epoch(self, n: int) -> int:
        return self._chunk(n)[0]

    def epoch_rows(self, order: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        t0 = time.perf_counter()
        n = len(order)
        k, per_round = self._chunk(n)
        rnd, j = divmod(epoch, per_round)
        perm = torch.randperm(n, generator=generator_for(self.seed, "rs2", rnd))
        rows = perm[j * k : (j + 1) * k]
        self.stats["select_seconds"] += time.perf_counter() - t0
        return rows
