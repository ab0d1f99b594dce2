"""HFT (Hui et al. 2024): half of the parameter matrices train, the other half stay frozen.

The target Linear layers are grouped by the layer they sit in (the first ``.<number>.`` of their
name; everything else is one more group), and within each group a seeded half of the matrices
(with their biases) trains. Nothing is added to the model, so there is nothing to merge.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import Field
from torch import nn

from attar.adapt.base import Adapter, AdapterParams, Calibration, count_params, match_modules, register, set_trainable


def layer_group(name: str) -> str:
    m = re.search(r"(^|\.)(\d+)(\.|$)", name)
    return name[: m.end(2)] if m else "(outside numbered layers)"


@register("hft")
class HFT(Adapter):
    summary = "half fine-tuning: a seeded half of the weight matrices in every layer trains, the rest is frozen"

    class Params(AdapterParams):
        targets: list[str] = Field(default_factory=lambda: [".*"], description="Linear module name patterns")
        fraction: float = Field(0.5, gt=0, le=1, description="share of the matrices in each layer that trains")
        mask_seed: int | None = Field(None, description="seed of the choice (default: the run's seed)")

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        names = match_modules(model, self.p.targets, (nn.Linear,), what="adapter 'hft'")
        set_trainable(model, self.p.train_head)
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(layer_group(n), []).append(n)
        g = torch.Generator().manual_seed(int(self.p.mask_seed if self.p.mask_seed is not None else seed) + 104729)
        chosen: list[str] = []
        for members in groups.values():
            k = max(1, round(self.p.fraction * len(members)))
            order = torch.randperm(len(members), generator=g).tolist()
            chosen += [members[i] for i in sorted(order[:k])]
        for n in chosen:
            model.get_submodule(n).requires_grad_(True)
        return {"targets": len(names), "trained_matrices": chosen, "trainable": count_params(model)[0]}
