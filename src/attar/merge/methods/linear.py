"""Linear merge / uniform soup: a weighted average of whole models (Wortsman et al., 2022)."""

from __future__ import annotations

import torch
from pydantic import Field

from attar.errors import AttarError
from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.merge.methods.params import Weight
from attar.registry import Params


def linear(x: TensorInputs) -> torch.Tensor:
    weights = [float(p["weight"]) for p in x.params]
    out = torch.zeros_like(x.models[0])
    for w, t in zip(weights, x.models):
        out.add_(t, alpha=w)
    if x.options["normalize"]:
        total = sum(weights)
        if abs(total) < 1e-12:
            raise AttarError(
                f"linear merge of {x.name!r}: the weights sum to zero, so normalize would divide by zero. "
                "Set `normalize: false` or change the weights."
            )
        out.div_(total)
    return out


class LinearParams(Params):
    weight: Weight = 1.0
    normalize: bool = Field(True, description="divide by the summed weights")


register(
    MergeMethod(
        name="linear",
        summary="weighted average of the models (uniform soup with equal weights)",
        fn=linear,
        base="optional",
        base_is_input=True,
        min_models=1,
        Params=LinearParams,
        reference="https://arxiv.org/abs/2203.05482",
    )
)
