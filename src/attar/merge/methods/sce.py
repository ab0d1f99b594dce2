"""SCE (Select, Calculate, Erase; FuseChat 2024): merge task vectors weighted by their energy.

With task vectors τᵢ = θᵢ − base (the config's ``weight`` is not used, as in mergekit):

1. **Select**: when ``select_topk`` < 1, keep the entries whose variance across the τᵢ (population variance)
   is among the k = ⌊select_topk · #nonzero variances⌋ largest, in every τᵢ; zero the rest.
2. **Calculate**: model i's weight is its mean squared entry, mean(τᵢ²), divided by the sum over models
   (equal weights when that sum is below 1e-6).
3. **Erase**: elect each entry's sign from Σ τᵢ (TIES; ties positive) and drop the τᵢ entries of the other sign.

    merged = base + Σ wᵢ·mᵢ·τᵢ / max(Σ wᵢ·mᵢ, 1e-6),   mᵢ the entries of τᵢ with the elected sign
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.registry import Params


def sce_select(tvs: torch.Tensor, density: float) -> torch.Tensor:
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask


def sce(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    tvs = torch.stack([m - x.base for m in x.models], dim=0)
    topk = float(x.options["select_topk"])
    if topk < 1:
        tvs = tvs * sce_select(tvs, topk).unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = (tvs.sign() == majority).to(tvs.dtype)
    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    w = torch.ones_like(energy) / energy.shape[0] if abs(total) < 1e-6 else energy / total
    w = w.reshape(-1, *([1] * (tvs.dim() - 1)))
    kept = w * erase
    return x.base + (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)


class SceParams(Params):
    select_topk: float = Field(1.0, ge=0.0, le=1.0, description="the fraction of entries (by variance across the models) kept")


register(
    MergeMethod(
        name="sce",
        summary="select high-variance entries, weight task vectors by their mean square, erase minority signs",
        fn=sce,
        min_models=1,
        Params=SceParams,
        reference="https://arxiv.org/abs/2408.07990",
    )
)
