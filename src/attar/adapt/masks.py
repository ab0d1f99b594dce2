"""What the parameter-mask adapters share: a Linear whose weight trains only on a fixed set of entries.

:class:`SparseDeltaLinear` keeps the base weight frozen and trains a vector ``delta`` with one value
per selected entry (``index`` into the flattened weight): ``W = W0 + scatter(index, delta)``. The
gradient reaching ``delta`` is exactly the full gradient masked to the selected entries, every
step, by construction; and unlike a gradient hook on a dense weight, nothing outside the mask can
move (AdamW's decoupled weight decay would otherwise shrink every frozen entry), while the
optimizer keeps state for the selected entries only. Merging writes ``W0 + delta`` back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attar.adapt.base import AdapterModule
from attar.errors import AttarError


class SparseDeltaLinear(AdapterModule):
    def __init__(self, base: nn.Linear, index: torch.Tensor):
        super().__init__()
        index = index.flatten().to(torch.long)
        if index.numel() == 0:
            raise AttarError("a sparse mask selected no entries; raise the fraction")
        self.base = base
        base.requires_grad_(False)
        self.register_buffer("index", torch.sort(index.to(base.weight.device)).values)
        self.delta = nn.Parameter(torch.zeros(self.index.numel(), dtype=base.weight.dtype, device=base.weight.device))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def effective_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.flatten().index_add(0, self.index, self.delta).view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.base.bias)

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.base.weight.numel(), dtype=torch.bool, device=self.index.device)
        m[self.index] = True
        return m.view_as(self.base.weight)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w = self.base.weight
        w.view(-1).index_add_(0, self.index, self.delta.to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"entries={self.index.numel()} of {self.base.weight.numel()}"


def topk_index(score: torch.Tensor, fraction: float, largest: bool = True) -> torch.Tensor:
    """Flat indices of the ``fraction`` highest (or lowest) entries of ``score`` (at least one)."""
    k = max(1, int(round(fraction * score.numel())))
    return torch.topk(score.flatten(), k, largest=largest, sorted=False).indices
