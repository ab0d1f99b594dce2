"""LIFT-style principal-weight masks (Liu et al. 2025): train only the largest entries of a low-rank approximation.

For each target weight W, ``W_r`` = its best rank-``rank`` approximation (SVD); the ``fraction`` of
entries where ``|W_r|`` is largest are the "principal weights" and the only ones that train (a
:class:`~attar.adapt.masks.SparseDeltaLinear`). The paper's default is the top 5%.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from attar.adapt.base import Adapter, AdapterParams, Calibration, _set_module, count_params, match_modules, register, set_trainable
from attar.adapt.lora_init import top_svd
from attar.adapt.masks import SparseDeltaLinear, topk_index


@register("lift")
class LIFT(Adapter):
    summary = "train the top-k% entries of each weight's low-rank approximation (principal weights)"

    class Params(AdapterParams):
        targets: list[str] = Field(default_factory=lambda: [".*"], description="Linear module name patterns")
        rank: int = Field(32, ge=1, description="rank of the approximation that ranks the entries")
        fraction: float = Field(0.05, gt=0, le=1, description="share of each weight's entries that trains")

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        names = match_modules(model, self.p.targets, (nn.Linear,), what="adapter 'lift'")
        set_trainable(model, self.p.train_head)
        for n in names:
            base = model.get_submodule(n)
            U, S, Vh = top_svd(base.weight, self.p.rank)
            approx = (U * S[None, :]) @ Vh
            _set_module(model, n, SparseDeltaLinear(base, topk_index(approx.abs(), self.p.fraction)))
        return {"targets": len(names), "trainable": count_params(model)[0]}
