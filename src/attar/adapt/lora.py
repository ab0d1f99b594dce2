"""LoRA (Hu et al. 2021): ``y = W x + b + s·B(A(dropout(x)))``, ``s = alpha / rank``, with four initialisers.

* ``default``: A Kaiming-uniform (as PEFT), B = 0, so training starts at the base model.
* ``pissa``: A, B from the top-``rank`` singular triplets of W (``s·B@A`` = the principal part);
  the base keeps the residual ``W − s·B@A`` (PiSSA, Meng et al. 2024).
* ``lora_ga``: A, B from the SVD of the full-weight gradient on a few batches (A = top right
  singular vectors, B = the next ``rank`` left ones, scaled by ``d_out^{1/4}/sqrt(gamma)``), so the
  first LoRA step follows the full fine-tuning gradient; the base keeps ``W − s·B@A``
  (LoRA-GA, Wang et al. 2024, the authors' ``ArB2r`` / ``stable`` choice).
* ``eva``: A = the top right singular vectors of the layer's input activations on a few batches,
  B = 0; ranks are redistributed across layers by explained variance (budget ``rank × layers``,
  at most ``rho × rank`` per layer; a layer may get 0 and no adapter). The scale stays
  ``alpha / rank`` in every layer (EVA, Paischer et al. 2024; PEFT's ``adjust_scaling_factors``).

When an initialiser changes the base weight it records ``lora_A0``/``lora_B0`` (buffers), so the
adapter can still be exported against the untouched base as a rank-2r PEFT LoRA
(``W0 + s·(B@A − B0@A0)``, exact).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attar.adapt.base import (
    Adapter, AdapterModule, AdapterParams, Calibration, _set_module, count_params, match_modules, register, set_trainable,
)  # fmt: skip
from attar.errors import AttarError


class LoRALinear(AdapterModule):
    """A frozen ``nn.Linear`` (``base``) plus a trainable low-rank update ``s·B@A``."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: float | None = None):
        super().__init__()
        if rank < 1:
            raise AttarError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = int(rank)
        self.scaling = float(alpha) / rank if scaling is None else float(scaling)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A0: torch.Tensor | None
        self.lora_B0: torch.Tensor | None
        self.register_buffer("lora_A0", None)
        self.register_buffer("lora_B0", None)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` of a Linear keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.base.weight, self.base.bias)
        low = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        # In place: the base output is not needed by any backward (its weight is frozen), so this saves
        # the extra [.., out] tensors that `out + low * s` would allocate.
        return out.add_(low, alpha=self.scaling)

    @torch.no_grad()
    def set_init(self, A: torch.Tensor, B: torch.Tensor, subtract_from_base: bool) -> None:
        """Set A and B; when ``subtract_from_base`` the base keeps ``W − s·B@A`` (so the output is unchanged)."""
        self.lora_A.data = A.to(self.lora_A.dtype).contiguous()
        self.lora_B.data = B.to(self.lora_B.dtype).contiguous()
        if subtract_from_base:
            w = self.base.weight
            w.copy_((w.float() - self.scaling * (self.lora_B.float() @ self.lora_A.float())).to(w.dtype))
            self.lora_A0 = self.lora_A.detach().clone()
            self.lora_B0 = self.lora_B.detach().clone()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        base = self.base
        base.weight.add_(self.delta_weight().to(base.weight.dtype))
        return base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}" + (", base offset" if self.lora_A0 is not None else "")


INITS = ("default", "pissa", "lora_ga", "eva")


class LoRAParams(AdapterParams):
    rank: int = Field(8, ge=1, description="rank r of B@A")
    alpha: float = Field(16.0, gt=0, description="scale s = alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    targets: list[str] = Field(default_factory=lambda: ["query", "value"], description="Linear module name patterns")
    init: Literal["default", "pissa", "lora_ga", "eva"] = Field("default", description="initialiser: " + ", ".join(INITS))
    calib_batches: int = Field(8, ge=1, description="lora_ga / eva: training batches to estimate the gradient / activations")
    calib_batch_size: int = Field(16, ge=1)
    ga_gamma: float = Field(16.0, gt=0, description="lora_ga: stable scale d_out^(1/4)/sqrt(gamma)")
    eva_rho: float = Field(2.0, ge=1.0, description="eva: a layer gets at most rho*rank components")


@register("lora")
class LoRA(Adapter):
    summary = "low-rank update s·B@A on Linear layers; init default | pissa | lora_ga | eva"
    Params = LoRAParams
    exports_peft = True

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.p.init in ("lora_ga", "eva")

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        from attar.adapt import lora_init

        p = self.p
        names = match_modules(model, p.targets, (nn.Linear,), what="adapter 'lora'")
        if self.needs_calibration and (calib is None or not calib.batches):
            raise AttarError(f"LoRA init {p.init!r} needs a few training batches (a Calibration); none were given.")
        ranks = {n: p.rank for n in names}
        grads: dict[str, torch.Tensor] = {}
        eva_A: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {"init": p.init, "targets": len(names)}
        if p.init == "lora_ga":
            grads = lora_init.full_gradients(model, names, calib, seed)
        elif p.init == "eva":
            eva_A, ev = lora_init.eva_components(model, names, calib, p.rank, p.eva_rho)
            ranks = {n: int(eva_A[n].shape[0]) for n in names}
            info["eva_ranks"] = ranks
            info["eva_explained_variance"] = ev
        set_trainable(model, p.train_head)
        torch.manual_seed(seed)  # default init of A
        scaling = p.alpha / p.rank
        for n in names:
            if ranks[n] == 0:
                continue  # EVA gave this layer no components
            base = model.get_submodule(n)
            mod = LoRALinear(base, ranks[n], p.alpha, p.dropout, scaling=scaling)
            base.requires_grad_(False)
            if p.init == "pissa":
                A, B = lora_init.pissa(base.weight, p.rank, scaling)
                mod.set_init(A, B, subtract_from_base=True)
            elif p.init == "lora_ga":
                A, B = lora_init.lora_ga(grads[n], p.rank, p.ga_gamma, n)
                mod.set_init(A, B, subtract_from_base=True)
            elif p.init == "eva":
                mod.set_init(eva_A[n], torch.zeros(base.out_features, ranks[n]), subtract_from_base=False)
            _set_module(model, n, mod)
        info["trainable"] = count_params(model)[0]
        return info


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
