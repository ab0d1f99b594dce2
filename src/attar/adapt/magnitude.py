"""Magnitude-based sparse fine-tuning: train only the largest (or, as in SaRA, the smallest) entries of each weight.

The mask is fixed before training from ``|W|`` and applied every step through a
:class:`~attar.adapt.masks.SparseDeltaLinear` (the gradient reaching the trained values is the full
gradient restricted to the mask).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from attar.adapt.base import Adapter, AdapterParams, Calibration, _set_module, count_params, match_modules, register, set_trainable
from attar.adapt.masks import SparseDeltaLinear, topk_index


@register("magnitude")
class Magnitude(Adapter):
    summary = "train the largest (or smallest, SaRA-style) k% entries of each weight by |W|"

    class Params(AdapterParams):
        targets: list[str] = Field(default_factory=lambda: [".*"], description="Linear module name patterns")
        fraction: float = Field(0.05, gt=0, le=1, description="share of each weight's entries that trains")
        select: Literal["largest", "smallest"] = Field("largest", description="which entries by |W|")

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        names = match_modules(model, self.p.targets, (nn.Linear,), what="adapter 'magnitude'")
        set_trainable(model, self.p.train_head)
        for n in names:
            base = model.get_submodule(n)
            idx = topk_index(base.weight.detach().abs(), self.p.fraction, largest=self.p.select == "largest")
            _set_module(model, n, SparseDeltaLinear(base, idx))
        return {"targets": len(names), "trainable": count_params(model)[0]}
