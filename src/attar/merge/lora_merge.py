"""Merge LoRA adapters of one base model into one PEFT LoRA adapter, exactly, by concatenating their ranks.

Each adapter i adds ``ΔW_i = s_i·B_i@A_i`` to a layer (``s_i`` = alpha/r, alpha/√r with rsLoRA, per-module
``alpha_pattern``/``rank_pattern`` honoured). A weighted sum of the deltas, ``Σ c_i ΔW_i`` (a linear merge of the
fine-tunes with ``c_i = w_i/Σw``, task arithmetic with ``c_i = λ_i``), is itself a LoRA of rank ``Σ r_i``::

    A = [A_1; A_2; ...]          (rows stacked)
    B = [c_1 s_1 B_1, c_2 s_2 B_2, ...]   (columns stacked), written with scale 1 (lora_alpha = rank)

Why concatenation rather than averaging A and B separately or re-factorising Σ c_i B_i A_i by SVD to rank r:
averaging the factors is not the average of their products (B̄Ā ≠ mean BA; it adds cross terms B_i A_j), and an
SVD to the original rank drops whatever does not fit, so neither equals the merge of the full models. The
concatenated adapter does, to float rounding, for the price of a rank that grows with the number of adapters
(3 adapters of rank 8: rank 24, still ~1% of SmolLM2-135M's parameters). Methods that are not linear in the
deltas (TIES, DARE, RegMean, ...) have no low-rank form: merge the full models for those.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from attar.adapt.lora import anchored
from attar.adapt.peft_format import check_plain_init
from attar.checkpoint import atomic_save_safetensors
from attar.errors import AttarError
from attar.io import staged_folder
from attar.merge.tensor_source import open_safetensors, read_json

PREFIX = "base_model.model."
# a factor's key ending -> (which factor, the key template of both); embeddings' factors have no ".weight"
_PARTS = {".lora_A.weight": ("A", ".lora_{}.weight"), ".lora_B.weight": ("B", ".lora_{}.weight"),
          ".lora_embedding_A": ("A", ".lora_embedding_{}"), ".lora_embedding_B": ("B", ".lora_embedding_{}")}


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule (``get_pattern_key``): the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: str | Path, label: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, float]]:
    """``(config, {module: {"A": A, "B": B, "template": key ending}}, {module: scale})`` of a PEFT LoRA adapter."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise AttarError(f"{label}: {folder} is not a PEFT adapter folder (no adapter_config.json).")
    cfg = read_json(folder / "adapter_config.json")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise AttarError(f"{label}: adapter type {cfg.get('peft_type')!r} is not LoRA; only LoRA adapters concatenate.")
    if cfg.get("use_dora"):
        raise AttarError(f"{label}: DoRA adapters rescale the merged weight, so they do not add; merge the full models.")
    check_plain_init(cfg, label)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AttarError(f"{label}: {weights} is missing (attar reads adapters in safetensors only).")
    with open_safetensors(weights) as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    modules: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in _PARTS if key.endswith(s)), None)
        if suffix is None or not key.startswith(PREFIX):
            raise AttarError(f"{label}: {key} is not a LoRA factor (a trained head or bias, modules_to_save); such "
                             "tensors are whole weights, not low-rank deltas: merge the full models instead.")
        module = key[len(PREFIX): -len(suffix)]
        part, template = _PARTS[suffix]
        modules.setdefault(module, {"template": template})[part] = t
    scales = {}
    for module, f in modules.items():
        if "A" not in f or "B" not in f:
            raise AttarError(f"{label}: {module} has only one of its two LoRA factors.")
        r = _pattern(cfg.get("rank_pattern"), module, cfg.get("r", 8))
        alpha = _pattern(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
        if int(f["A"].shape[0]) != int(r):
            raise AttarError(f"{label}: {module} has rank {f['A'].shape[0]} in the file but {r} in adapter_config.json.")
        scales[module] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return cfg, modules, scales


def lora_delta(f: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """``scale·B@A`` as stored (embeddings: [embedding_dim, num_embeddings], the transpose of their weight)."""
    return scale * (f["B"].double() @ f["A"].double())


def merge_lora_adapters(folders: Sequence[str | Path], coefficients: Sequence[float], out: str | Path,
                        labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the adapter whose delta is ``Σ c_i ΔW_i`` (rank-concatenated, module docstring) into ``out``.

    A module adapted by some adapters only gets zero factors from the others. Returns what was written
    (``rank``: {module: rank}, ``modules``)."""
    labels = list(labels) if labels is not None else [f"adapter {i}" for i in range(len(folders))]
    if len(folders) != len(coefficients) or not folders:
        raise AttarError(f"got {len(coefficients)} coefficients for {len(folders)} adapters; give one per adapter.")
    read = [read_adapter(f, lab) for f, lab in zip(folders, labels)]
    cfg0 = read[0][0]
    bases = {c.get("base_model_name_or_path") for c, _, _ in read}
    order = list(dict.fromkeys(m for _, mods, _ in read for m in mods))
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module in order:
        ref = next(mods[module] for _, mods, _ in read if module in mods)
        a_cols, b_rows = ref["A"].shape[1], ref["B"].shape[0]
        As, Bs = [], []
        for (_, mods, scales), c, lab in zip(read, coefficients, labels):
            f = mods.get(module)
            if f is None:
                continue  # this adapter leaves the module alone: its block would be zeros
            if f["A"].shape[1] != a_cols or f["B"].shape[0] != b_rows:
                raise AttarError(f"{lab}: {module} has factors {tuple(f['B'].shape)} @ {tuple(f['A'].shape)}, another "
                                 f"adapter {(b_rows, '_')} @ {('_', a_cols)}; adapters of different bases do not merge.")
            As.append(f["A"].float())
            Bs.append(float(c) * scales[module] * f["B"].float())
        tensors[PREFIX + module + ref["template"].format("A")] = torch.cat(As, 0).contiguous()
        tensors[PREFIX + module + ref["template"].format("B")] = torch.cat(Bs, 1).contiguous()
        ranks[module] = sum(int(a.shape[0]) for a in As)
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {m: r for m, r in ranks.items() if r != r0}
    from peft import LoraConfig  # peft only when an adapter is written

    cfg = LoraConfig(r=r0, lora_alpha=r0, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
                     target_modules=anchored(order), lora_dropout=float(cfg0.get("lora_dropout", 0.0)),
                     task_type=cfg0.get("task_type"), bias="none", init_lora_weights=True,
                     base_model_name_or_path=cfg0.get("base_model_name_or_path"))
    out = Path(out)
    with staged_folder(out) as tmp:
        cfg.save_pretrained(str(tmp))
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "attar_merge.json").write_text(json.dumps(
            {"method": "rank concatenation of sum_i c_i * s_i * B_i @ A_i", "adapters": [str(f) for f in folders],
             "coefficients": [float(c) for c in coefficients], "bases": sorted(b for b in bases if b)}, indent=2))
    return {"rank": ranks, "modules": len(order)}
