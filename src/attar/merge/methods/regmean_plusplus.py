"""RegMean++ (FusionBench's ``regmean_plusplus``): RegMean whose Grams see the merged model's own activations.

Plain RegMean computes every Gram on model i's own forward pass, so layer l's Gram describes inputs that
model i's layers < l produce, not the inputs the merged model will feed it. RegMean++ merges block by block
in forward order: the Gram of block b's linear layers for model i comes from a forward pass whose parts
*before* block b are already merged (linear layers by RegMean, everything else averaged) while block b
itself is model i's. Then block b is merged and the next block's Grams see it.

A block is a linear layer by default (the finest order); ``blocks`` names containers (an ``nn.ModuleList``
such as ``encoder.layers``) whose children are blocks, as FusionBench's CLIP version uses the encoder
layers: then a block's non-linear parts (its LayerNorms) run as model i's while its Grams are taken, and
its inner linear layers' Grams see model i's own earlier sublayers. Cost: one forward pass over each model's
rows per block; memory: one model, the state dicts, and one block's Grams.
Difference from FusionBench's CLIP code: parameters after the last block (CLIP's final LayerNorm) stay the
pretrained model's there; here they are averaged (linear ones merged by RegMean), as in plain RegMean.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from attar.errors import AttarError
from attar.merge.methods._state import check_same_keys, weighted_average
from attar.merge.methods.base import MergeMethod, StateDict, register
from attar.merge.methods.regmean import GramHooks, RegMeanParams, Reduce, batches, forward, linear_modules, regmean_weight, weight_key
from attar.merge.methods.soup import ModelMergeResult


def _call_order(model: nn.Module, data: Any, batch_size: int) -> list[str]:
    """Linear modules in the order a forward pass first calls them (those never called are left out)."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n) if n not in order else None)
               for n, m in linear_modules(model).items()]
    try:
        with torch.no_grad():
            forward(model, next(batches(data, batch_size, batch_size)))
    finally:
        for h in handles:
            h.remove()
    return order


def _block_of(name: str, containers: Sequence[str]) -> str:
    for c in containers:
        if name.startswith(c + "."):
            return c + "." + name[len(c) + 1 :].split(".")[0]
    return name


def regmean_plusplus(
    models: Sequence[nn.Module],
    data: Sequence[Any],
    *,
    alpha: float = 0.95,
    weights: Sequence[float] | None = None,
    examples: int = 256,
    batch_size: int = 32,
    reduce: Reduce = "mean",
    blocks: Sequence[str] = (),
) -> ModelMergeResult:
    """Merge ``models`` (one architecture) with RegMean++; ``data[i]`` holds model i's own input rows (or batches).

    ``info["blocks"]`` lists the blocks in merge order with their linear layers."""
    if len(data) != len(models):
        raise AttarError(f"regmean_plusplus needs one input set per model; got {len(data)} for {len(models)} models.")
    sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in models]
    check_same_keys(sds)
    w = [1.0] * len(models) if weights is None else [float(v) for v in weights]
    if any(v <= 0 for v in w):
        raise AttarError(f"RegMean weights scale each model's Grams and must be > 0; got {w}.")
    template = models[0]
    known = set(linear_modules(template))
    for c in blocks:
        if not any(n.startswith(c + ".") for n in known):
            raise AttarError(f"regmean_plusplus blocks: no linear layer lies under {c!r}; give a container of the "
                             f"model's layers (e.g. an nn.ModuleList's name), linear layers: {sorted(known)[:6]}.")
    order = _call_order(template, data[0], batch_size)
    groups: dict[str, list[str]] = {}
    for n in order:
        groups.setdefault(_block_of(n, blocks), []).append(n)
    avg = weighted_average(sds, w)
    merged: dict[str, torch.Tensor] = {}
    mods = dict(template.named_modules())
    was = template.training
    template.eval()
    try:
        for block, linears in groups.items():
            own = [k for k in avg if k.startswith(block + ".")]
            grams = []
            for sd, d in zip(sds, data):
                state = {**avg, **merged, **{k: sd[k] for k in own}}
                hooks = GramHooks({n: mods[n] for n in linears})
                try:
                    with torch.no_grad():
                        for b in batches(d, batch_size, examples):
                            forward(lambda *a, **kw: functional_call(template, state, a, kw), b)
                finally:
                    grams.append(hooks.result(reduce))
            for n in linears:
                if all(n in g for g in grams):
                    key = weight_key(n)
                    merged[key] = regmean_weight([sd[key] for sd in sds], [g[n] for g in grams], alpha, w).to(avg[key].dtype)
    finally:
        template.train(was)
    out = {**avg, **merged}
    return ModelMergeResult(out, {"regmean": [n for ls in groups.values() for n in ls if weight_key(n) in merged], "alpha": alpha,
                                  "blocks": {b: ls for b, ls in groups.items()}})


def _run(state_dicts: Sequence[StateDict], *, models: Sequence[nn.Module] | None = None,
         data: Sequence[Any] | None = None, **kw: Any) -> ModelMergeResult:
    if models is None or data is None:
        raise AttarError("regmean_plusplus needs the models and each model's input rows: pass models=[...] and data=[...].")
    kw = {k: kw[k] for k in ("alpha", "weights", "examples", "batch_size", "reduce", "blocks") if k in kw}
    return regmean_plusplus(models, data, **kw)


class RegMeanPlusPlusParams(RegMeanParams):
    blocks: list[str] = Field(default_factory=list, description="containers (e.g. an nn.ModuleList's name) whose "
                                                                "children are merged as one block each; default: each linear layer is a block")


register(
    MergeMethod(
        name="regmean_plusplus",
        summary="RegMean++: RegMean block by block, each Gram taken on the merged-so-far model's activations (needs data)",
        level="model",
        run=_run,
        base="none",
        min_models=1,
        Params=RegMeanPlusPlusParams,
        reference="https://arxiv.org/abs/2508.03121",
    )
)
