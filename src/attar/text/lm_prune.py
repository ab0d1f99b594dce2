"""Structured depth pruning of a causal LM: drop the decoder layers that change their input least.

The importance of layer ``i`` is its *block influence* (Men et al., ShortGPT 2024; the depth score Minitron
compares): ``1 − mean cos(h_in, h_out)`` over the non-padding tokens of some calibration text, where ``h_in``
and ``h_out`` are the hidden states entering and leaving the layer. A layer whose output points where its
input did adds little; removing the lowest-scoring ones keeps the most of the model. The pruned model is an
ordinary Hugging Face model (its config says the new depth) that saves and reloads with plain transformers;
recovery (fine-tuning or distillation from the unpruned model) is then an ``lm`` stage like any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attar.errors import AttarError

__all__ = ["decoder_layers", "layer_importance", "calibration_pass", "drop_layers", "prune_depth"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks (``model.model.layers`` for Llama/Qwen/Gemma, ``transformer.h`` for GPT-2)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj: Any = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    raise AttarError(f"{type(inner).__name__}: no stack of decoder layers found (looked for model.layers and "
                     "transformer.h); depth pruning supports Llama-, Qwen-, Gemma- and GPT-2-style causal LMs.")


@torch.no_grad()
def layer_importance(model: nn.Module, ids: Tensor, pad_id: int, batch_size: int = 8) -> Tensor:
    """Block influence of every decoder layer on ``ids`` (``[N, L]``, right-padded): ``1 − mean cosine``."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    current: dict[str, Tensor] = {}

    def hook(i: int):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            keep = current["keep"]
            cos = nn.functional.cosine_similarity(h_in[keep].double(), h_out[keep].double(), dim=-1)
            sums[i] += float((1 - cos).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    count = calibration_pass(model, ids, pad_id, batch_size, handles, current, "layer_importance")
    return (sums / count).float()


@torch.no_grad()
def calibration_pass(model: nn.Module, ids: Tensor, pad_id: int, batch_size: int, handles: list, current: dict,
                     who: str) -> int:
    """Run ``model`` in eval mode over ``ids`` in batches so its ``handles`` (hooks) can measure it; each batch's
    non-padding mask is ``current["keep"]`` while it runs. Removes the hooks and restores the mode; returns the
    number of tokens measured (refuses none)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    count = 0
    try:
        for a in range(0, len(ids), batch_size):
            x = ids[a : a + batch_size].to(dev)
            attn = (x != pad_id).long()
            current["keep"] = attn.bool()
            model(input_ids=x, attention_mask=attn)
            count += int(attn.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if count == 0:
        raise AttarError(f"{who}: the calibration text has no tokens.")
    return count


def drop_layers(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove decoder layers ``drop`` in place; the config and each kept layer's cache index follow."""
    layers = decoder_layers(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in drop))
    if any(not 0 <= i < n for i in drop):
        raise AttarError(f"drop_layers: layer indices must be in [0, {n}), got {drop}.")
    if len(drop) >= n:
        raise AttarError(f"drop_layers: dropping {len(drop)} of {n} layers leaves none.")
    kept = [layers[i] for i in range(n) if i not in drop]
    for new_idx, layer in enumerate(kept):  # the KV cache is indexed by layer_idx
        for mod in layer.modules():
            if hasattr(mod, "layer_idx") and isinstance(mod.layer_idx, int):
                mod.layer_idx = new_idx
    layers._modules.clear()
    for i, layer in enumerate(kept):
        layers.add_module(str(i), layer)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for attr in ("num_hidden_layers", "n_layer"):
            if getattr(cfg, attr, None) == n:
                setattr(cfg, attr, len(kept))
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            cfg.layer_types = [t for i, t in enumerate(types) if i not in drop]
    return model


def prune_depth(model: nn.Module, ids: Tensor, pad_id: int, keep: int) -> tuple[nn.Module, dict[str, Any]]:
    """Keep the ``keep`` decoder layers with the highest block influence on ``ids``; returns the model and a
    record of the scores and the dropped layers."""
    n = len(decoder_layers(model))
    if not 1 <= keep <= n:
        raise AttarError(f"prune: keep {keep} layers of {n}? keep must be between 1 and {n}.")
    scores = layer_importance(model, ids, pad_id)
    order = torch.argsort(scores, stable=True)  # least influential first
    drop = sorted(int(i) for i in order[: n - keep])
    drop_layers(model, drop)
    return model, {"layers_before": n, "layers_after": keep, "dropped": drop,
                   "block_influence": [round(float(s), 5) for s in scores]}
