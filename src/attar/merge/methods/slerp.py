"""SLERP: spherical interpolation between two models, tensor by tensor.

Each tensor is treated as one flat vector: the result follows the great circle
from the base (t=0) to the other model (t=1), rescaled to the inputs' norms.
When the two directions are nearly parallel (|cos| > ``dot_threshold``) the
arc is numerically meaningless, so it falls back to linear interpolation, as
mergekit does.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.registry import Params


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = a.norm(), b.norm()
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold or a.numel() == 0:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * v0 + (math.sin(t * theta) / s) * v1


def slerp(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    return slerp_tensors(float(x.options["t"]), x.base, x.models[0], float(x.options["dot_threshold"]))


class SlerpParams(Params):
    t: float = Field(0.5, ge=0.0, le=1.0, description="the interpolation point, base at 0, other model at 1")
    dot_threshold: float = Field(0.9995, ge=0.0, le=1.0, description="the |cosine| above which slerp falls back to linear")


register(
    MergeMethod(
        name="slerp",
        summary="spherical interpolation between base (t=0) and one other model (t=1)",
        fn=slerp,
        min_models=1,
        max_models=1,
        Params=SlerpParams,
        reference="https://en.wikipedia.org/wiki/Slerp",
    )
)
