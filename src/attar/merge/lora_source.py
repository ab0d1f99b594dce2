"""A PEFT LoRA adapter as a merge input: its base with the adapter merged in, tensor by tensor."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attar.adapt.peft_format import check_plain_init, check_saved_modules
from attar.errors import AttarError
from attar.merge.tensor_source import TensorSource, open_safetensors, read_json


@dataclass
class _LoraDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    kind: str  # "linear" or "embedding"


class LoraSource(TensorSource):
    """A base model with a PEFT LoRA adapter merged in, tensor by tensor.

    Matches PEFT's ``merge_and_unload``: ΔW = scale·B@A, transposed for
    ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings; scale is
    alpha/r (alpha/√r with rsLoRA), alpha from ``alpha_pattern`` when it names
    the module. Other tensors in the adapter (``modules_to_save``, trained
    biases, and the ``X.base_layer.weight`` copies PEFT saves of targeted
    embeddings and heads) replace the base's, and a LoRA update is added on top,
    as PEFT does. Adapters whose initialisation moved the base weights (PiSSA,
    OLoRA, CorDA, LoftQ, LoRA-GA) are refused until converted. The adapter file
    is small, so it is read whole.
    """

    kind = "lora"

    def __init__(self, adapter_dir: Path, label: str, base: TensorSource):
        super().__init__(adapter_dir, label)
        self.base = base
        self.config, self.state, self.root = base.config, base.state, base.root
        cfg = read_json(adapter_dir / "adapter_config.json")
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise AttarError(f"{label}: adapter type {cfg.get('peft_type')!r} is not LoRA; only LoRA adapters can be merged.")
        if cfg.get("use_dora"):
            raise AttarError(f"{label}: DoRA adapters are not supported yet; merge it with PEFT's merge_and_unload first.")
        # Here, not at the top: the adapt package (PEFT's format, and peft itself) is only needed to merge an adapter.

        check_plain_init(cfg, label)
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.exists():
            if (adapter_dir / "adapter_model.bin").exists():
                raise AttarError(f"{label}: adapter_model.bin is pickled; attar reads adapter_model.safetensors only.")
            raise AttarError(f"{label}: {weights} is missing.")
        with open_safetensors(weights) as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        check_saved_modules(cfg, list(tensors), base.names(), label)
        alpha = float(cfg.get("lora_alpha", 8))
        alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        rslora = bool(cfg.get("use_rslora", False))
        base_names = base.names()
        name_set = set(base_names)
        # Whole tensors the adapter carries (modules_to_save, e.g. a classifier head): when the base lacks
        # them, say so instead of guessing that the adapter belongs to another model.
        to_save = [re.escape(m) for m in cfg.get("modules_to_save") or []]
        saved = {re.sub(r"\.modules_to_save\.[^.]+\.", ".", k.removeprefix("base_model.model."))
                 for k in tensors if to_save and re.search(rf"(^|\.)({'|'.join(to_save)})\.", k)}
        absent: list[str] = []

        def to_base(key: str) -> str:
            if key in name_set:
                return key
            hits = [n for n in base_names if n.endswith("." + key) or key.endswith("." + n)]
            if not hits and key in saved:
                absent.append(key)
                return key
            if len(hits) != 1:
                raise AttarError(
                    f"{label}: adapter tensor for {key!r} matches {len(hits)} tensors of the base "
                    f"{base.label} ({hits[:3]}); is this adapter for that base model?"
                )
            return hits[0]

        self._deltas: dict[str, _LoraDelta] = {}
        self._replace: dict[str, torch.Tensor] = {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            k = key.removeprefix("base_model.model.")
            m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight|(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", k)
            if m:
                module = m.group(1) or m.group(3)
                part = m.group(2) or m.group(4)
                kind = "linear" if m.group(1) else "embedding"
                pairs.setdefault(module, {"kind": kind})[part] = t
            elif "lora_magnitude_vector" in k:
                raise AttarError(f"{label}: DoRA adapters are not supported yet.")
            elif re.search(r"\.lora_[A-Za-z_]+", k):
                raise AttarError(f"{label}: adapter tensor {key!r} is of a LoRA variant attar cannot merge yet.")
            else:
                k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k).replace(".base_layer.", ".")
                self._replace[to_base(k)] = t
        if absent:
            raise AttarError(_missing_head_message(label, adapter_dir, base.label, absent, cfg))
        for module, p in pairs.items():
            if "A" not in p or "B" not in p:
                raise AttarError(f"{label}: module {module!r} has only one of lora_A / lora_B.")
            a, b = p["A"].float(), p["B"].float()
            r = a.shape[0]
            mod_alpha = alpha
            for pattern, value in alpha_pattern.items():
                if re.fullmatch(rf"(.*\.)?{pattern}", module):
                    mod_alpha = float(value)
                    break
            scale = mod_alpha / (r ** 0.5 if rslora else r)
            target = to_base(f"{module}.weight")
            d = _LoraDelta(a, b, scale, p["kind"])
            shape = self._delta(d, fan_in_fan_out).shape
            if tuple(shape) != base.shape(target):
                raise AttarError(
                    f"{label}: LoRA update for {target!r} has shape {tuple(shape)} but the base {base.label} has "
                    f"{base.shape(target)}; check fan_in_fan_out and that the adapter belongs to this base."
                )
            self._deltas[target] = d
        self._fan_in_fan_out = fan_in_fan_out
        for name, t in self._replace.items():
            if tuple(t.shape) != base.shape(name):
                raise AttarError(f"{label}: adapter tensor {name!r} has shape {tuple(t.shape)}, the base {base.shape(name)}.")

    @staticmethod
    def _delta(d: _LoraDelta, fan_in_fan_out: bool) -> torch.Tensor:
        if d.kind == "embedding":
            return (d.b @ d.a).T * d.scale
        if d.a.dim() > 2:  # convolution: A is a conv kernel, B a 1x1 conv
            out = torch.einsum("or,r...->o...", d.b.flatten(1), d.a)
        else:
            out = d.b @ d.a
        return (out.T if fan_in_fan_out else out) * d.scale

    @property
    def format(self) -> str:
        return self.base.format

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        dtype = self.base.dtype(name)
        t = self._replace[name] if name in self._replace else self.base.get(name)
        d = self._deltas.get(name)
        if d is None:
            return t.to(dtype)
        return (t.float() + self._delta(d, self._fan_in_fan_out)).to(dtype)

    def close(self) -> None:
        self.base.close()


def _missing_head_message(label: str, adapter_dir: Path, base_label: str, absent: list[str], cfg: dict[str, Any]) -> str:
    """The adapter carries whole modules (``modules_to_save``, usually a new classification head) its base lacks."""
    modules = sorted({n.rsplit(".", 1)[0] for n in absent})
    model_dir = adapter_dir.parent / "model"
    if (adapter_dir.parent / "metrics.json").is_file() and (model_dir / "config.json").is_file():
        fix = (f"This is an attar fine-tune's adapter: its merged model, head included, is {model_dir}; use that folder "
               f"as the merge input instead.")
    else:
        fix = (f"Build the full model first, e.g. `attar finetune apply-peft {base_label} {adapter_dir} --out DIR` "
               "(or PEFT's merge_and_unload on the base loaded with its task head, saved with save_pretrained), "
               "and use DIR as the merge input.")
    return (
        f"{label}: the adapter carries {', '.join(repr(m) for m in modules)} (modules_to_save "
        f"{cfg.get('modules_to_save')}, tensors {absent[:4]}), which its base {base_label} does not have: the base is "
        f"the bare model and that module (usually the classification head) was created during fine-tuning, so it "
        f"has no place to go and the merge would lose it. {fix}"
    )
