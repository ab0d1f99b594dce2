"""Passthrough: copy one model's tensors (optionally scaled); with ``slices``, build a model from layer ranges.

``merge_method: passthrough`` takes exactly one input per tensor. With ``models: [one]`` it copies the
model; per-model ``scale`` multiplies its tensors (e.g. ``scale: [{filter: o_proj, value: 0}, {value: 1}]``).
With ``slices`` (mergekit's frankenmerges), each slice names one source and a ``layer_range``; the output's
layers are the slices' layers in order, renumbered from 0 (the engine maps the names, this method copies).
"""

from __future__ import annotations

from typing import Annotated, Optional

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.merge.methods.params import F32_MAX, PER_MODEL
from attar.registry import Params


def passthrough(x: TensorInputs) -> torch.Tensor:
    scale = x.params[0].get("scale")
    return x.models[0].clone() if scale is None else x.models[0] * float(scale)


class PassthroughParams(Params):
    scale: Annotated[Optional[float], Field(ge=-F32_MAX, le=F32_MAX, description="a factor on the copied tensor"), PER_MODEL] = None


register(
    MergeMethod(
        name="passthrough",
        summary="copy one model's tensors (optionally scaled); with slices, stack layer ranges (frankenmerge)",
        fn=passthrough,
        base="optional",
        base_is_input=True,
        min_models=1,
        max_models=1,
        Params=PassthroughParams,
        reference="https://github.com/arcee-ai/mergekit",
    )
)
