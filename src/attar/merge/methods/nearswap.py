"""NearSwap: take the other model's value where it lies close to the base's, interpolate elsewhere.

Per entry, with a the base and b the other model:

    w = clamp(t / max(|a − b|, 1e-6), 0, 1)        merged = w · b + (1 − w) · a

Where |a − b| ≤ t the entry is b's; farther apart it moves only t toward b (a fixed step), so large
differences keep the base's value. (mergekit's ``nearswap``.)
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.merge.methods.params import F32_MAX
from attar.registry import Params


def nearswap(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    a, b = x.base, x.models[0]
    w = (float(x.options["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


class NearSwapParams(Params):
    t: float = Field(..., ge=0.0, le=F32_MAX, description="the distance |base − other| within which the other model's value is taken")


register(
    MergeMethod(
        name="nearswap",
        summary="the other model's entries where they are within t of the base's, a step of t toward them elsewhere",
        fn=nearswap,
        min_models=1,
        max_models=1,
        Params=NearSwapParams,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
