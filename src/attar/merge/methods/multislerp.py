"""Multi-SLERP: a weighted spherical mean of several models (or of their task vectors), in one step.

Each input (θᵢ, or θᵢ − base with a base) is flattened and put on the unit sphere (uᵢ = vᵢ/(‖vᵢ‖ + eps));
with weights wᵢ (divided by Σ wᵢ when ``normalize_weights``):

    m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖,   g = Σ wᵢ (uᵢ − ⟨uᵢ, m⟩ m)   (tangent vectors at m)
    merged = (cos(‖g‖)·m + sin(‖g‖)·g/‖g‖) · Σ wᵢ‖vᵢ‖    (‖g‖ with + eps; the base added back)

One input is returned as it is; two inputs whose weighted unit mean is ~0 fall back to w₁v₁ + w₂v₂.
(mergekit's ``multislerp``; ``karcher`` iterates to the exact spherical mean.)
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.errors import AttarError
from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.merge.methods.params import Weight
from attar.registry import Params


def multislerp(x: TensorInputs) -> torch.Tensor:
    if len(x.models) == 1:
        return x.models[0]
    eps = float(x.options["eps"])
    v = torch.stack(x.models, dim=0)
    if x.base is not None:
        v -= x.base
    flat = v.view(v.shape[0], -1)
    w = torch.tensor([float(p["weight"]) for p in x.params], dtype=v.dtype)
    if x.options["normalize_weights"]:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if v.shape[0] == 2:
            out = (v[0] * w[0] + v[1] * w[1]).view(v.shape[1:])
            return out + x.base if x.base is not None else out
        raise AttarError(f"multislerp of {x.name!r}: the weighted mean of the inputs' directions is zero (antipodal "
                         "inputs with balancing weights); change the weights.")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(v.shape[1:])
    return out + x.base if x.base is not None else out


class MultiSlerpParams(Params):
    weight: Weight = 1.0
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, le=1.0, description="added to norms to avoid dividing by zero")


register(
    MergeMethod(
        name="multislerp",
        summary="weighted spherical mean of several models (or task vectors) by one tangent-space step",
        fn=multislerp,
        base="optional",
        min_models=1,
        Params=MultiSlerpParams,
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)
