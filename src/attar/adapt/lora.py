"""LoRA (Hu et al. 2021) on PEFT's layers: ``y = W x + b + s·B(A(dropout(x)))``, ``s = alpha / rank``, four initialisers.

The layers are PEFT's own (``inject_adapter_in_model`` into the Hugging Face model of an HFClassifier),
so forward, merge and file format are PEFT's. ``default`` and ``pissa`` are PEFT's initialisers
(``init_lora_weights=True`` / ``"pissa"``). ``lora_ga`` and ``eva`` are attar's
(:mod:`attar.adapt.lora_init`), set on PEFT's layers after injection: PEFT 0.21's LoRA-GA is another
variant (B weighted by the gradient's singular values; its first step is not the full gradient's
rank-2r truncation), and its EVA never returns when a layer sees fewer rows per batch than
``rho·rank`` (BERT's pooler on a small batch); docs/adapt.md has the numbers.

Initialisers that move the base weight (PiSSA, LoRA-GA) keep the initial A, B as ``lora_A0``/``lora_B0``
buffers of the layer, so the adapter still exports against the untouched base (``attar.adapt.peft_format``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from attar.adapt import lora_init
from attar.adapt.base import (
    Adapter, AdapterModule, AdapterParams, Calibration, adapter_parameters, count_params, is_adapter, match_modules,
    register, set_trainable,
)  # fmt: skip
from attar.errors import AttarError

# peft (and with it transformers) is imported where a LoRA layer is made: `import attar.adapt` stays off it,
# which keeps `attar --help` fast.
ADAPTER = "default"  # PEFT's adapter name; attar puts one LoRA adapter on a model at a time


def hf_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The Hugging Face model inside an HFClassifier (its module names are PEFT's) and its prefix, or the model."""
    hf = getattr(model, "hf", None)
    return (hf, "hf.") if isinstance(hf, nn.Module) else (model, "")


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The LoRA layers attar put on ``model`` (the tagged adapters that are PEFT's rather than attar's own)."""
    return {n: m for n, m in model.named_modules() if is_adapter(m) and not isinstance(m, AdapterModule)}


def inject(root: nn.Module, cfg: Any, state: dict[str, torch.Tensor] | None = None):
    """PEFT's LoRA layers for ``cfg`` in ``root`` (with ``state``'s weights, PEFT's key names), tagged as attar adapters.

    Returns ``{name: layer}`` and, with ``state``, PEFT's load result (missing / unexpected keys). The
    ``peft_config`` PEFT leaves on the model is removed: attar's model is a plain module with PEFT layers."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(cfg, root, adapter_name=ADAPTER)
    layers = {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer)}
    for m in layers.values():
        m.attar_adapter = True
        m.train(m.get_base_layer().training)  # PEFT's new layers start in training mode (their dropout on)
    try:
        loaded = set_peft_model_state_dict(root, state, adapter_name=ADAPTER) if state is not None else None
    finally:
        root.__dict__.pop("peft_config", None)
    return layers, loaded


def anchored(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


@torch.no_grad()
def set_init(layer: nn.Module, A: torch.Tensor | None, B: torch.Tensor | None, moves_base: bool) -> None:
    """Set A and B (where given). ``moves_base``: the base keeps ``W − s·B@A`` (PEFT's PiSSA did that itself)
    and the initial A, B are kept for the export."""
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    for w, new in ((a, A), (b, B)):
        if new is not None:
            w.copy_(new)
    if moves_base:
        if A is not None:
            w = layer.get_base_layer().weight
            w.copy_((w.float() - layer.scaling[ADAPTER] * (b.float() @ a.float())).to(w.dtype))
        layer.register_buffer("lora_A0", a.detach().clone())
        layer.register_buffer("lora_B0", b.detach().clone())


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
    summary = "low-rank update s·B@A on Linear layers (PEFT's layers); init default | pissa | lora_ga | eva"
    Params = LoRAParams

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.p.init in ("lora_ga", "eva")

    def apply(self, model: nn.Module, calib: Calibration | None = None, seed: int = 0) -> dict[str, Any]:
        from peft import LoraConfig

        p = self.p
        names = match_modules(model, p.targets, (nn.Linear,), what="adapter 'lora'")
        if self.needs_calibration and (calib is None or not calib.batches):
            raise AttarError(f"LoRA init {p.init!r} needs a few training batches (a Calibration); none were given.")
        root, pre = hf_root(model)
        info: dict[str, Any] = {"init": p.init, "targets": len(names)}
        ranks = {n: p.rank for n in names}
        init_A: dict[str, torch.Tensor] = {}
        init_B: dict[str, torch.Tensor] = {}
        if p.init == "lora_ga":
            grads = lora_init.full_gradients(model, names, calib, seed)
            for n in names:
                init_A[n], init_B[n] = lora_init.lora_ga(grads.pop(n), p.rank, p.ga_gamma, n)
        elif p.init == "eva":
            init_A, info["eva_explained_variance"] = lora_init.eva_components(model, names, calib, p.rank, p.eva_rho)
            ranks = info["eva_ranks"] = {n: int(init_A[n].shape[0]) for n in names}
        kept = [n for n in names if ranks[n] > 0]  # EVA may give a layer no components, and then no adapter
        odd = {re.escape(n[len(pre):]): ranks[n] for n in kept if ranks[n] != p.rank}
        cfg = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout,
                         target_modules=anchored([n[len(pre):] for n in kept]), rank_pattern=odd,
                         alpha_pattern={k: p.alpha * r / p.rank for k, r in odd.items()},  # s stays alpha/rank
                         init_lora_weights="pissa" if p.init == "pissa" else True)
        torch.manual_seed(seed)  # PEFT's default init of A
        layers, _ = inject(root, cfg)
        for n in kept:
            set_init(layers[n[len(pre):]], init_A.get(n), init_B.get(n), moves_base=p.init in ("pissa", "lora_ga"))
        set_trainable(model, p.train_head)
        for layer in layers.values():
            for w in adapter_parameters(layer):
                w.requires_grad_(True)
        info["trainable"] = count_params(model)[0]
        return info
