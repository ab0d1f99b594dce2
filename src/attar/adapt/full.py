"""Baselines in the adapter registry: ``full`` (every parameter trains) and ``head`` (only the classifier)."""

from __future__ import annotations

from typing import Any

from torch import nn

from attar.adapt.base import Adapter, AdapterParams, Calibration, count_params, register, set_trainable


@register("full")
class Full(Adapter):
    summary = "full fine-tuning: every parameter trains"

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        model.requires_grad_(True)
        return {"trainable": count_params(model)[0]}


@register("head")
class Head(Adapter):
    summary = "head only (linear probe): the backbone is frozen"

    class Params(AdapterParams):
        pass

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        set_trainable(model, train_head=True)
        return {"trainable": count_params(model)[0]}
