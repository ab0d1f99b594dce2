"""Fine-tuning and adapters: LoRA on PEFT's layers (default / PiSSA / LoRA-GA / EVA inits), SSF, HFT, LIFT and
magnitude masks, MeZO.

* ``ADAPTERS`` / ``build_adapter({"name": "lora", "rank": 8, "init": "pissa"})``; ``adapter.apply(model, calib, seed)``
  adapts a model in place; :func:`merge_adapters` folds every adapter back into the base architecture.
* :func:`export_peft` / :func:`import_peft`: LoRA adapters in the PEFT format (PEFT's layers, PEFT's loader).
* :class:`MeZO` / :func:`mezo_fit`: zeroth-order fine-tuning with forward passes only.
* :func:`finetune`: the whole path (text data -> Hugging Face classifier -> adapter -> train -> save).

See docs/adapt.md.
"""

from attar.adapt import full, hft, lift, lora, magnitude, ssf  # noqa: F401  (register the adapters)
from attar.adapt.base import (
    ADAPTERS,
    Adapter,
    AdapterModule,
    Calibration,
    adapter_fields,
    build_adapter,
    count_params,
    has_adapters,
    match_modules,
    merge_adapters,
)
from attar.adapt.lora import lora_modules
from attar.adapt.masks import SparseDeltaLinear
from attar.adapt.mezo import MeZO, MeZOConfig, mezo_fit
from attar.adapt.peft_format import export_peft, import_peft
from attar.adapt.ssf import SSFLayerNorm, SSFLinear

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterModule",
    "Calibration",
    "LoRALinear",
    "MeZO",
    "MeZOConfig",
    "SSFLayerNorm",
    "SSFLinear",
    "SparseDeltaLinear",
    "adapter_fields",
    "build_adapter",
    "count_params",
    "export_peft",
    "finetune",
    "has_adapters",
    "import_peft",
    "lora_modules",
    "match_modules",
    "merge_adapters",
    "mezo_fit",
]


def __getattr__(name: str):
    if name == "LoRALinear":  # the layer attar's LoRA uses: PEFT's, imported on use (peft imports transformers)
        from peft.tuners.lora import Linear

        return Linear
    if name in ("finetune", "FinetuneResult", "FinetuneSpec"):
        from attar.adapt import api

        return getattr(api, name)
    raise AttributeError(name)
