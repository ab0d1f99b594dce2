"""SSF (Lian et al. 2022): a learned per-channel scale γ and shift β after Linear and LayerNorm outputs.

``y = γ ⊙ f(x) + β``. Both f are affine per output channel, so SSF folds into the weights exactly:
Linear ``W' = diag(γ) W``, ``b' = γ ⊙ b + β``; LayerNorm ``w' = γ ⊙ w``, ``b' = γ ⊙ b + β``. After
:func:`attar.adapt.merge_adapters` the model is the plain base architecture again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attar.adapt.base import (
    Adapter, AdapterModule, AdapterParams, Calibration, _set_module, count_params, match_modules, register, set_trainable,
)  # fmt: skip


class _SSF(AdapterModule):
    def __init__(self, base: nn.Module, channels: int, init_std: float):
        super().__init__()
        self.base = base
        ref = next(base.parameters())
        self.ssf_scale = nn.Parameter(torch.ones(channels, dtype=ref.dtype, device=ref.device))
        self.ssf_shift = nn.Parameter(torch.zeros(channels, dtype=ref.dtype, device=ref.device))
        if init_std > 0:
            nn.init.normal_(self.ssf_scale, 1.0, init_std)
            nn.init.normal_(self.ssf_shift, 0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.ssf_shift, self.base(x), self.ssf_scale)

    def _fold_bias(self, bias: torch.Tensor | None) -> torch.Tensor:
        b = bias if bias is not None else torch.zeros_like(self.ssf_shift)
        return self.ssf_scale * b + self.ssf_shift


class SSFLinear(_SSF):
    def __init__(self, base: nn.Linear, init_std: float = 0.0):
        super().__init__(base, base.out_features, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.ssf_shift, F.linear(x, self.base.weight, self.base.bias), self.ssf_scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        base = self.base
        bias = self._fold_bias(base.bias)
        base.weight.mul_(self.ssf_scale[:, None])
        if base.bias is None:
            base.bias = nn.Parameter(bias.clone(), requires_grad=base.weight.requires_grad)
        else:
            base.bias.copy_(bias)
        return base


class SSFLayerNorm(_SSF):
    def __init__(self, base: nn.LayerNorm, init_std: float = 0.0):
        if not base.elementwise_affine:
            base.weight = nn.Parameter(torch.ones(base.normalized_shape), requires_grad=False)
            base.bias = nn.Parameter(torch.zeros(base.normalized_shape), requires_grad=False)
            base.elementwise_affine = True
        super().__init__(base, base.normalized_shape[-1], init_std)

    @torch.no_grad()
    def merged(self) -> nn.LayerNorm:
        base = self.base
        bias = self._fold_bias(base.bias)
        base.weight.mul_(self.ssf_scale)
        if base.bias is None:
            base.bias = nn.Parameter(bias.clone(), requires_grad=base.weight.requires_grad)
        else:
            base.bias.copy_(bias)
        return base


@register("ssf")
class SSF(Adapter):
    summary = "per-channel scale and shift after Linear/LayerNorm outputs, folded into the weights on export"
    target_types = (nn.Linear, nn.LayerNorm)

    class Params(AdapterParams):
        targets: list[str] = Field(default_factory=lambda: [".*"], description="Linear/LayerNorm module name patterns")
        init_std: float = Field(0.0, ge=0, description="0 starts at the base model; the paper draws γ~N(1,σ), β~N(0,σ)")

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        names = match_modules(model, self.p.targets, (nn.Linear, nn.LayerNorm), what="adapter 'ssf'")
        set_trainable(model, self.p.train_head)
        torch.manual_seed(seed)
        for n in names:
            base = model.get_submodule(n)
            mod = SSFLinear(base, self.p.init_std) if isinstance(base, nn.Linear) else SSFLayerNorm(base, self.p.init_std)
            _set_module(model, n, mod)
        return {"targets": len(names), "trainable": count_params(model)[0]}
