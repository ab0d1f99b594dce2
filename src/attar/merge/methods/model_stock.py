"""Model Stock (Jang et al. 2024): interpolate between the fine-tunes' average and the base by their angle.

With k fine-tunes wᵢ of a base w₀ and task vectors τᵢ = wᵢ − w₀, cos θ is the mean pairwise cosine of the τᵢ
and the interpolation ratio t = k·cos θ / (1 + (k − 1)·cos θ):

    merged = t · (Σ wᵢ / k) + (1 − t) · w₀

Per tensor (the whole tensor is one vector), or with ``filter_wise`` per row (each output filter of a
[out, in, ...] tensor has its own cos θ and t along the last axis; a 1-D tensor is one row). Where
1 + (k − 1)·cos θ is (nearly) zero there is no finite ratio and the base is kept (t = 0), as in mergekit.
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.registry import Params


def model_stock_tensors(base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if base.dim() == 1 else w for w in models]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


def model_stock(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    return model_stock_tensors(x.base, x.models, bool(x.options["filter_wise"]))


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one ratio per row (output filter) instead of one per tensor")


register(
    MergeMethod(
        name="model_stock",
        summary="interpolate the fine-tunes' average toward the base by t = k·cosθ/(1+(k−1)·cosθ)",
        fn=model_stock,
        min_models=2,
        Params=ModelStockParams,
        reference="https://arxiv.org/abs/2403.19522",
    )
)
