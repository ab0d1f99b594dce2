"""NuSLERP: SLERP of two models (or of their task vectors), whole-tensor, row-wise or column-wise.

t = w₂ / (w₁ + w₂) from the two models' weights (0.5 when they sum to ~0). Without a base the two
models' tensors are interpolated; with a base their task vectors τᵢ = θᵢ − base are, and the base is
added back. ``nuslerp_flatten: true`` (default) treats the tensor as one vector; ``false`` interpolates
each row (each vector along the last axis) on its own, or each column with ``nuslerp_row_wise: true``.
For vectors u₀, u₁ with cos Ω = ⟨u₀/‖u₀‖, u₁/‖u₁‖⟩:

    slerp = (sin((1 − t)Ω)·u₀ + sin(tΩ)·u₁) / sin Ω,   linear (1 − t)·u₀ + t·u₁ where 1 − cos²Ω ≤ 1e-16

Unlike ``slerp`` the result is not rescaled to the inputs' norms. (mergekit's ``nuslerp``.)
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.merge.methods.params import Weight
from attar.registry import Params


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False,
                    eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp(x: TensorInputs) -> torch.Tensor:
    w = [float(p["weight"]) for p in x.params]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if x.options["nuslerp_row_wise"] else -1
    flatten = bool(x.options["nuslerp_flatten"])
    a, b = x.models
    if x.base is None:
        return nuslerp_tensors(t, a, b, dim=dim, flatten=flatten)
    return x.base + nuslerp_tensors(t, a - x.base, b - x.base, dim=dim, flatten=flatten)


class NuSlerpParams(Params):
    weight: Weight = 1.0
    nuslerp_flatten: bool = Field(True, description="treat each tensor as one flat vector")
    nuslerp_row_wise: bool = Field(False, description="without flatten: interpolate columns (vectors along the first axis) instead of rows")


register(
    MergeMethod(
        name="nuslerp",
        summary="SLERP of two models or their task vectors at t = w2/(w1+w2), flattened, per row or per column",
        fn=nuslerp,
        base="optional",
        min_models=2,
        max_models=2,
        Params=NuSlerpParams,
        reference="https://github.com/arcee-ai/mergekit",
    )
)
