"""G_stack (Du et al. 2024, "Stacking Your Transformers"): grow a trained small model depth-wise, then keep training.

Why: a model of ``L`` blocks trained briefly, stacked ``factor`` times into ``factor * L`` blocks (block ``i`` of the
big model is a copy of block ``i mod L``: the whole stack repeated, the paper's G_direct stacking), starts the big
model's training from learned weights; the paper reaches the plain run's loss with 194B instead of 300B tokens on
7B models. Everything outside the block list (embeddings, final norm, head) is copied as is.

The grown model does **not** compute the source's function: each block is applied ``factor`` times, so its outputs
change at the moment of growth (G_stack does not claim function preservation; the tests check the weights are the
stacked copies, not the outputs). The block list is found by structure: the longest ``ModuleList``/``Sequential``
whose children all have the same parameter names and shapes (``transformer.h`` of GPT-2, ``model.layers`` of
Llama-style models).
"""

from __future__ import annotations

import torch
from torch import nn

from attar.errors import AttarError


def _signature(m: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in m.state_dict().items())


def block_list(model: nn.Module) -> tuple[str, nn.Module]:
    """``(path, container)`` of the model's repeated blocks: the longest ModuleList (or Sequential of two or more)
    whose children are structurally identical (ties: the first found)."""
    best: tuple[str, nn.Module] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < (1 if isinstance(mod, nn.ModuleList) else 2):
            continue  # (a one-block ModuleList is a block list; a one-module Sequential is just a wrapper)
        sigs = {_signature(c) for c in mod}
        if len(sigs) == 1 and next(iter(sigs)) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise AttarError(f"train.growth g_stack: {type(model).__name__} has no list of identical blocks to stack "
                         "(it stacks transformer-style block lists, e.g. GPT-2's transformer.h; a ConvNet's blocks "
                         "change shape from one to the next).")
    return best


def g_stack(source: nn.Module, target: nn.Module, factor: int) -> nn.Module:
    """Load ``target`` (the big model, built fresh) with ``source``'s weights stacked ``factor`` times; returns it."""
    s_path, s_blocks = block_list(source)
    t_path, t_blocks = block_list(target)
    if len(t_blocks) != factor * len(s_blocks):
        raise AttarError(f"train.growth g_stack: the source has {len(s_blocks)} blocks, so factor {factor} makes "
                         f"{factor * len(s_blocks)}, but the stage's model has {len(t_blocks)}; build it with "
                         f"{factor * len(s_blocks)} blocks or change the factor.")
    src = source.state_dict()
    s_pre, t_pre = (s_path + "." if s_path else ""), (t_path + "." if t_path else "")
    out = {}
    for key, t_val in target.state_dict().items():
        if key.startswith(t_pre) and key[len(t_pre):].split(".", 1)[0].isdigit():
            i, rest = key[len(t_pre):].split(".", 1)
            skey = f"{s_pre}{int(i) % len(s_blocks)}.{rest}"
        else:
            skey = key
        if skey not in src or src[skey].shape != t_val.shape:
            raise AttarError(f"train.growth g_stack: the stage's model tensor {key!r} (shape {tuple(t_val.shape)}) has "
                             f"no counterpart {skey!r} of that shape in the source; the two models must differ only "
                             "in depth (same width, vocabulary, heads).")
        out[key] = src[skey].detach().clone()
    with torch.no_grad():
        target.load_state_dict(out)
    return target
