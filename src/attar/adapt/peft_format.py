"""LoRA adapters in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

attar's LoRA layers are PEFT's (``attar.adapt.lora``), so what is written here is what PEFT itself
keeps. :func:`export_peft` writes what ``peft.PeftModel.from_pretrained(base, folder)`` loads onto the
untouched base model (the Hugging Face model inside an :class:`~attar.text.hf.HFClassifier`):

* each LoRA layer as ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``;
* initialisers that moved the base weight (PiSSA, LoRA-GA) export ``W0 + s·(B@A − B0@A0)`` exactly,
  as a rank-2r LoRA (``A' = [A; A0]``, ``B' = [B, −B0]``), through ``rank_pattern`` (PEFT's
  ``path_initial_model_for_weight_conversion`` does the same from an initial adapter on disk);
* per-layer ranks (EVA) through ``rank_pattern`` and ``alpha_pattern`` (so ``alpha/r`` is each layer's scale);
* the trained classification head as ``modules_to_save``.

``target_modules`` is one anchored regular expression naming exactly the adapted modules. The same
folder feeds ``attar merge`` as ``BASE+ADAPTER``. :func:`import_peft` puts such a folder (written here
or by PEFT) onto a plain model with PEFT's own loader, after the checks a merge needs: an
initialisation that moved the base weights must have been converted, and a listed head must be there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from attar.adapt.base import AdapterModule, adapter_parameters, head_names
from attar.adapt.lora import ADAPTER, anchored, hf_root, inject, lora_modules
from attar.checkpoint import atomic_save_safetensors
from attar.io import staged_folder
from attar.errors import AttarError

PREFIX = "base_model.model."


@torch.no_grad()
def export_peft(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None,
                dropout: float = 0.0) -> Path:
    """Write the model's LoRA layers (and trained head) as a PEFT LoRA adapter folder."""
    root, pre = hf_root(model)
    loras = lora_modules(model)
    if not loras:
        raise AttarError("export_peft: the model has no LoRA layers; only LoRA adapters export in the PEFT format "
                         "(save other fine-tunes as a whole model with save_hf_classifier).")
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, AdapterModule)})
    if others:
        raise AttarError(f"export_peft: the model also holds {', '.join(others)} adapters, which PEFT LoRA cannot express; "
                         "merge the model and save it whole instead.")
    heads = [h for h in head_names(model) if any(p.requires_grad for p in model.get_submodule(h).parameters())]
    known = {id(p) for m in loras.values() for p in adapter_parameters(m)}
    known |= {id(p) for h in heads for p in model.get_submodule(h).parameters()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in known]
    if stray:
        raise AttarError(f"export_peft: parameters outside the LoRA layers and the head were trained ({stray[:5]}); "
                         "PEFT LoRA cannot carry them. Merge and save the whole model instead.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    for name, m in loras.items():
        rel = name[len(pre):]
        A, B = m.lora_A[ADAPTER].weight.detach(), m.lora_B[ADAPTER].weight.detach()
        if getattr(m, "lora_A0", None) is not None:
            A, B = torch.cat([A, m.lora_A0]), torch.cat([B, -m.lora_B0], dim=1)
        tensors[f"{PREFIX}{rel}.lora_A.weight"] = A.contiguous().clone()
        tensors[f"{PREFIX}{rel}.lora_B.weight"] = B.contiguous().clone()
        ranks[rel] = int(A.shape[0])
        scales[rel] = m.scaling[ADAPTER]
    for h in heads:
        for pname, p in model.get_submodule(h).named_parameters():
            tensors[f"{PREFIX}{h[len(pre):]}.{pname}"] = p.detach().contiguous().clone()
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    s0 = max(set(scales.values()), key=list(scales.values()).count)
    rank_pattern = {n: r for n, r in ranks.items() if r != r0}
    alpha_pattern = {n: scales[n] * ranks[n] for n in ranks if abs(scales[n] * ranks[n] - s0 * r0) > 1e-9 * max(1.0, s0 * r0)}
    from peft import LoraConfig  # off `import attar.adapt` (see attar.adapt.lora)

    cfg = LoraConfig(
        r=r0, lora_alpha=s0 * r0, lora_dropout=dropout, target_modules=anchored(list(ranks)), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern, modules_to_save=[h[len(pre):] for h in heads] or None,
        task_type="SEQ_CLS" if pre else None, bias="none", init_lora_weights=True,
        base_model_name_or_path=base_model_name_or_path or getattr(model, "source", None) or None,
    )
    folder = Path(folder)
    with staged_folder(folder) as tmp:
        cfg.save_pretrained(str(tmp))
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        if getattr(model, "classes", None):  # PEFT ignores this file; attar reads the class names back from it
            (tmp / "attar_text.json").write_text(json.dumps({"classes": list(model.classes)}, indent=2))
    return folder


# PEFT initialisations that also move the base weights (W_res = W − s·B0@A0 for PiSSA, OLoRA, CorDA and
# LoRA-GA; a quantised residual for LoftQ): the saved A and B then belong on that residual, so adding
# their product to the original base gives wrong weights without any error.
BASE_MOVING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA", "loftq": "LoftQ"}
_PLAIN_INITS = {"true", "false", "gaussian", "eva", "orthogonal", "mica"}  # the base weights stay untouched


def check_plain_init(cfg: dict[str, Any], label: str | Path) -> None:
    """Refuse an adapter whose ``init_lora_weights`` moved the base weights, with PEFT's conversion as the fix.

    Why refuse rather than redo PEFT's initialisation: PiSSA's fast SVD, CorDA and LoftQ depend on random
    state, data or a quantiser that the adapter folder does not record, so the residual cannot be rebuilt
    exactly; PEFT's own conversion turns the adapter into an ordinary LoRA delta that any base takes.
    """
    init = cfg.get("init_lora_weights", True)
    key = str(init).lower()
    if key in _PLAIN_INITS:
        return
    name = next((v for k, v in BASE_MOVING_INITS.items() if key.startswith(k)), None)
    if name is None:
        raise AttarError(
            f"{label}: adapter_config.json has init_lora_weights {init!r}, an initialisation attar does not know, so it "
            "cannot tell whether PEFT changed the base weights for it. Convert the adapter into a plain LoRA delta "
            "with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) or merge it with PEFT's "
            "merge_and_unload and use the merged model."
        )
    if name == "LoftQ":
        fix = ("LoftQ adapters cannot be converted: merge it with PEFT (`merge_and_unload`) onto the LoftQ-initialised "
               "base it was trained with, save that model, and use the saved folder instead.")
    else:
        fix = ("Convert it into a plain LoRA delta with PEFT, from the adapter saved right after initialisation "
               "(before training): `peft_model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT_DIR)`, "
               "then use OUT (its config says init_lora_weights: true); or merge it with PEFT (`merge_and_unload`) "
               "onto the residual base it was trained on and use the merged model.")
    raise AttarError(
        f"{label} is an unconverted {name} adapter (init_lora_weights: {init!r} in adapter_config.json). {name} moves "
        f"part of each adapted weight into the adapter at initialisation, so the saved A and B belong on that residual "
        f"base, not on the original weights; adding them to the original base gives wrong weights. {fix}"
    )


def check_saved_modules(cfg: dict[str, Any], keys: list[str], base_names: list[str], label: str | Path) -> None:
    """Refuse an adapter whose config lists ``modules_to_save`` (a trained head) that the base has, but whose
    file holds none of them.

    PEFT's PiSSA/OLoRA/CorDA conversion (``path_initial_model_for_weight_conversion``) writes only the LoRA
    tensors; merging such a file would silently keep the base's untrained head (PEFT itself fails to load it).
    """
    modules = [m for m in cfg.get("modules_to_save") or [] if isinstance(m, str)]
    if not modules:
        return
    pattern = re.compile(rf"(^|\.)({'|'.join(re.escape(m) for m in modules)})\.")
    if any(pattern.search(k) and ".lora_" not in k for k in keys) or not any(pattern.search(n) for n in base_names):
        return
    raise AttarError(
        f"{label}: adapter_config.json lists modules_to_save {modules} (trained whole, usually the task head), but "
        "adapter_model.safetensors holds none of their weights, so a merge would keep the base's untrained head. "
        "PEFT's conversion of PiSSA/OLoRA/CorDA adapters (path_initial_model_for_weight_conversion) drops them: copy "
        "the head's tensors (e.g. base_model.model.classifier.weight and .bias) from the unconverted adapter into the "
        "converted adapter_model.safetensors, or merge with PEFT (merge_and_unload) before converting."
    )


def adapter_classes(folder: str | Path) -> list[str] | None:
    """Class names stored with an adapter (written by :func:`export_peft`), else ``["0", ..]`` from a saved head."""
    folder = Path(folder)
    meta = folder / "attar_text.json"
    if meta.is_file():
        classes = json.loads(meta.read_text()).get("classes")
        if classes:
            return [str(c) for c in classes]
    w = folder / "adapter_model.safetensors"
    if w.is_file():
        from safetensors import safe_open

        with safe_open(str(w), framework="pt") as f:
            for k in f.keys():
                if re.search(r"(^|\.)(classifier|score)(\.modules_to_save\.[^.]+)?\.weight$", k) and ".lora_" not in k:
                    return [str(i) for i in range(f.get_slice(k).get_shape()[0])]
    return None


@torch.no_grad()
def import_peft(model: nn.Module, folder: str | Path, trainable: bool = True) -> nn.Module:
    """Put the LoRA layers (and ``modules_to_save``) of a PEFT adapter folder onto ``model``, in place.

    The layers are injected and loaded by PEFT (``inject_adapter_in_model`` + ``set_peft_model_state_dict``);
    the head tensors of ``modules_to_save`` are copied into the model's own head, so the result merges back
    into the plain architecture with :func:`attar.adapt.merge_adapters`."""
    folder = Path(folder)
    cfg_path, w_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AttarError(f"{folder} has no adapter_config.json; it is not a PEFT adapter folder.")
    if not w_path.is_file():
        extra = " (adapter_model.bin is pickled; attar reads safetensors only)" if (folder / "adapter_model.bin").exists() else ""
        raise AttarError(f"{folder} has no adapter_model.safetensors{extra}.")
    cfg = json.loads(cfg_path.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA" or cfg.get("use_dora"):
        raise AttarError(f"{folder}: only plain LoRA adapters can be imported (peft_type={cfg.get('peft_type')!r}, "
                         f"use_dora={cfg.get('use_dora')}).")
    check_plain_init(cfg, folder)
    if cfg.get("fan_in_fan_out"):
        raise AttarError(f"{folder}: fan_in_fan_out (Conv1D) adapters are not supported by import_peft.")
    root, _ = hf_root(model)
    tensors = load_file(str(w_path))
    check_saved_modules(cfg, list(tensors), list(root.state_dict()), folder)
    lora = {k: t for k, t in tensors.items() if ".lora_" in k}
    replace = {re.sub(r"\.modules_to_save\.[^.]+\.", ".", k.removeprefix(PREFIX)): t for k, t in tensors.items() if k not in lora}
    targets = sorted({re.sub(r"\.lora_[^.]+(\..*)?$", "", k.removeprefix(PREFIX)) for k in lora})
    own = dict(root.named_modules())
    missing = [n for n in targets if n not in own]
    if missing:
        raise AttarError(f"{folder}: the adapter targets modules the model does not have: {missing[:5]}; "
                         "is it an adapter for this base model?")
    kinds = sorted({type(own[n]).__name__ for n in targets if not isinstance(own[n], nn.Linear)})
    if kinds:
        raise AttarError(f"{folder}: the adapter adapts {', '.join(kinds)} modules; import_peft handles Linear layers.")
    from peft import LoraConfig  # off `import attar.adapt` (see attar.adapt.lora)

    config = LoraConfig.from_pretrained(str(folder))
    # Exactly the modules the file holds weights for; the head is copied below instead of PEFT's wrapper around it.
    config.target_modules, config.modules_to_save, config.inference_mode = anchored(targets), None, not trainable
    try:
        _, loaded = inject(root, config, lora)
    except RuntimeError as e:  # torch's size-mismatch report, one line per tensor
        raise AttarError(f"{folder}: the LoRA shapes do not fit the model: {' '.join(str(e).split())}") from None
    bad = sorted(k for k in loaded.unexpected_keys) + sorted(k for k in loaded.missing_keys if ".lora_" in k)
    if bad:
        raise AttarError(f"{folder}: the adapter's LoRA tensors do not match PEFT's LoRA layers for it ({bad[:4]}): "
                         "a LoRA variant attar cannot import, or an incomplete file.")
    state = root.state_dict()
    for rel, t in replace.items():
        if rel not in state:
            raise AttarError(f"{folder}: adapter tensor {rel!r} has no place in the model.")
        if tuple(state[rel].shape) != tuple(t.shape):
            raise AttarError(f"{folder}: adapter tensor {rel!r} has shape {tuple(t.shape)}, the model {tuple(state[rel].shape)}.")
        mod_name, _, pname = rel.rpartition(".")
        param = getattr(root.get_submodule(mod_name), pname)
        param.data.copy_(t.to(param.dtype))
        param.requires_grad_(trainable)
    return model
