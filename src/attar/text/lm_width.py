"""Structured width pruning of a causal LM: keep the MLP channels and attention heads that carry the most signal.

Minitron's activation-based importance (Muralidharan et al. 2024), measured on calibration text with forward
hooks and no gradients:

* an MLP channel ``j`` of a layer scores ``mean |a_j|`` over the non-padding tokens, where ``a`` is the input of
  the layer's ``down_proj`` (``act(gate) * up``: what the channel writes back to the residual stream);
* an attention head scores the mean L2 norm of its output (its slice of ``o_proj``'s input). Heads are kept in
  whole key/value groups (a KV head and the query heads that share it), so grouped-query attention keeps its
  ratio; a group scores the sum of its query heads.

Every layer keeps the same number of channels and groups (its own best ones, in their original order), because a
Hugging Face config has one ``intermediate_size`` and one head count: the pruned model is an ordinary model that
saves and reloads with plain transformers. A channel or group whose importance is exactly zero contributes
nothing, so pruning only such ones leaves the model's function unchanged (the tests build that case).
Llama-, Qwen2- and Gemma-3-style blocks (``mlp.gate_proj/up_proj/down_proj``, ``self_attn.q/k/v/o_proj``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attar.errors import AttarError
from attar.text.lm_prune import calibration_pass, decoder_layers

__all__ = ["width_importance", "prune_width", "shrink_width"]

_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _parts(layer: nn.Module, i: int) -> tuple[nn.Module, nn.Module]:
    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if mlp is None or attn is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP) \
            or not all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN):
        raise AttarError(f"width pruning: layer {i} ({type(layer).__name__}) is not a Llama/Qwen2/Gemma-3-style block "
                         "(mlp.gate_proj/up_proj/down_proj and self_attn.q/k/v/o_proj); prune depth instead "
                         "(prune: {layers: K}).")
    return mlp, attn


def _heads(model: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    heads, kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return heads, kv, head_dim


@torch.no_grad()
def width_importance(model: nn.Module, ids: Tensor, pad_id: int, batch_size: int = 8) -> dict[str, list[Tensor]]:
    """Per layer: ``mlp`` channel scores ``[intermediate]`` and ``heads`` query-head scores ``[num_heads]``."""
    layers = decoder_layers(model)
    heads, _, head_dim = _heads(model)
    mlp_sum: list[Tensor] = []
    head_sum: list[Tensor] = []
    current: dict[str, Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        mlp, attn = _parts(layer, i)
        mlp_sum.append(torch.zeros(mlp.down_proj.in_features, dtype=torch.float64))
        head_sum.append(torch.zeros(heads, dtype=torch.float64))

        def on_mlp(module, args, i=i):
            a = args[0][current["keep"]].double()
            mlp_sum[i] += a.abs().sum(0).cpu()

        def on_heads(module, args, i=i):
            a = args[0][current["keep"]].double()
            head_sum[i] += a.view(len(a), heads, head_dim).norm(dim=-1).sum(0).cpu()

        handles += [mlp.down_proj.register_forward_pre_hook(on_mlp), attn.o_proj.register_forward_pre_hook(on_heads)]
    count = calibration_pass(model, ids, pad_id, batch_size, handles, current, "width_importance")
    return {"mlp": [(s / count).float() for s in mlp_sum], "heads": [(s / count).float() for s in head_sum]}


def _linear(old: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    w = old.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.data[rows] if rows is not None else old.bias.data)
    new.weight.requires_grad_(old.weight.requires_grad)
    return new


def _top(scores: Tensor, k: int) -> Tensor:
    """The ``k`` best indices, in their original order (ties: the earlier one)."""
    order = torch.argsort(-scores, stable=True)[:k]
    return torch.sort(order).values


def prune_width(model: nn.Module, ids: Tensor, pad_id: int, mlp: int | None = None, kv_heads: int | None = None,
                ) -> tuple[nn.Module, dict[str, Any]]:
    """Keep ``mlp`` MLP channels and ``kv_heads`` key/value head groups in every layer (``None``: leave that width).

    Returns the model (changed in place) and a record: the widths before and after and each layer's kept indices
    (``shrink_width(model, record["kept"])`` gives another copy of the unpruned model the same shape)."""
    layers = decoder_layers(model)
    heads, kv, _ = _heads(model)
    inter = _parts(layers[0], 0)[0].down_proj.in_features
    if mlp is not None and not 1 <= mlp <= inter:
        raise AttarError(f"prune.mlp: keep {mlp} MLP channels of {inter}? it must be between 1 and {inter}.")
    if kv_heads is not None and not 1 <= kv_heads <= kv:
        raise AttarError(f"prune.kv_heads: keep {kv_heads} key/value head groups of {kv}? it must be between 1 and {kv} "
                         f"(each group is 1 key/value head and {heads // kv} query heads).")
    scores = width_importance(model, ids, pad_id)
    kept: list[dict[str, list[int]]] = []
    for i in range(len(layers)):
        k: dict[str, list[int]] = {}
        if mlp is not None:
            k["mlp"] = _top(scores["mlp"][i], mlp).tolist()
        if kv_heads is not None:
            k["kv_groups"] = _top(scores["heads"][i].view(kv, heads // kv).sum(-1), kv_heads).tolist()
        kept.append(k)
    shrink_width(model, kept)
    return model, {"mlp_before": inter, "kv_heads_before": kv, "heads_before": heads, "kept": kept,
                   "mlp_after": mlp or inter, "kv_heads_after": kv_heads or kv, "heads_after": (kv_heads or kv) * (heads // kv)}


def shrink_width(model: nn.Module, kept: list[dict[str, list[int]]]) -> nn.Module:
    """Keep, in layer ``i``, the MLP channels ``kept[i]["mlp"]`` and the key/value groups ``kept[i]["kv_groups"]``
    (either may be absent: that width stays); the config follows."""
    layers = decoder_layers(model)
    if len(kept) != len(layers):
        raise AttarError(f"shrink_width: {len(kept)} layer records for a model of {len(layers)} layers.")
    heads, kv, head_dim = _heads(model)
    group = heads // kv
    for i, (layer, k) in enumerate(zip(layers, kept)):
        m, a = _parts(layer, i)
        if "mlp" in k:
            ch = torch.tensor(k["mlp"], dtype=torch.long)
            m.gate_proj, m.up_proj = _linear(m.gate_proj, rows=ch), _linear(m.up_proj, rows=ch)
            m.down_proj = _linear(m.down_proj, cols=ch)
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = len(ch)
        if "kv_groups" in k:
            g = torch.tensor(k["kv_groups"], dtype=torch.long)
            q_heads = (g[:, None] * group + torch.arange(group)).flatten()
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            kv_rows = (g[:, None] * head_dim + torch.arange(head_dim)).flatten()
            a.q_proj, a.o_proj = _linear(a.q_proj, rows=q_rows), _linear(a.o_proj, cols=q_rows)
            a.k_proj, a.v_proj = _linear(a.k_proj, rows=kv_rows), _linear(a.v_proj, rows=kv_rows)
    cfg = model.config
    if "mlp" in kept[0]:
        cfg.intermediate_size = len(kept[0]["mlp"])
    if "kv_groups" in kept[0]:
        cfg.head_dim = head_dim  # explicit: hidden_size // heads no longer gives it
        cfg.num_key_value_heads = len(kept[0]["kv_groups"])
        cfg.num_attention_heads = cfg.num_key_value_heads * group
    return model
