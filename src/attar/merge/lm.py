"""Merging causal language models (Hugging Face ``*ForCausalLM``) with the data they were fine-tuned on.

The data-free methods (linear, task arithmetic, TIES, DARE, SLERP, ...) are the engine's per-tensor code on the
models' state dicts, as for any model. What differs for LMs is the data-aware part:

* **RegMean** takes each linear layer's input Gram over a few rows of each fine-tune's *own training text*
  (token positions are the rows; padding is left out). A tied output head (SmolLM2 shares it with the input
  embeddings) is averaged instead: its weight *is* the embedding table, which no least-squares on logits should
  move.
* **Greedy soup**, **WiSE-FT** and **LCSC** score a candidate by the mean validation perplexity over the domains
  (lower is better; the score they maximise is its negative), never by test text.

Every merge is reported by :func:`domain_perplexity` on each domain's test split.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from attar.distill.lm import perplexity
from attar.distill.lm_sampling import trim_padding
from attar.errors import AttarError
from attar.merge.evaluators import state_dicts
from attar.merge.methods import MERGE_METHODS, greedy_soup, lcsc_search, regmean_merge, wise_ft_sweep
from attar.merge.methods.regmean import GramHooks, Reduce, linear_modules
from attar.merge.stage import merge_models
from attar.merge.validate import check_finite, check_state_dicts
from attar.text.lm_split import LMSplit

#: Model-level methods with an LM form here; the others are written for image classifiers (labels, logits).
LM_MODEL_METHODS = ("regmean", "greedy_soup", "wise_ft", "lcsc")


def lm_methods() -> list[str]:
    """Every merge method a causal-LM merge accepts: all tensor-level ones and :data:`LM_MODEL_METHODS`."""
    return [n for n in MERGE_METHODS.names() if MERGE_METHODS.get(n).level == "tensor" or n in LM_MODEL_METHODS]


def check_lm_method(method: str) -> None:
    if method not in lm_methods():
        raise AttarError(f"merge method {method!r} is written for image classifiers (it reads labels or class "
                         f"logits); for language models use one of: {', '.join(lm_methods())}.")


def token_batches(split: LMSplit, pad_id: int, rows: int, batch_size: int = 8) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``rows`` rows of ``split`` as ``{input_ids, attention_mask}`` batches, right padding trimmed."""
    n = min(rows, len(split))
    for i in range(0, n, batch_size):
        part = split.slice(i, min(n, i + batch_size))
        ids, _ = trim_padding(part.ids, part.mask, pad_id)
        yield {"input_ids": ids, "attention_mask": (ids != pad_id).long()}


def tied_linears(model: nn.Module) -> list[str]:
    """Linear modules whose weight is shared with another parameter (a head tied to the input embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return [n for n, m in linear_modules(model).items() if len(owners.get(id(m.weight), [])) > 1]


@torch.no_grad()
def lm_grams(model: nn.Module, split: LMSplit, pad_id: int, *, rows: int = 32, batch_size: int = 8,
             reduce: Reduce = "mean") -> dict[str, torch.Tensor]:
    """``{linear module: Gram of its inputs}`` over the real tokens of the first ``rows`` rows of ``split``
    (a tied head left out, see the module docstring)."""
    tied = set(tied_linears(model))
    hooks = GramHooks({n: m for n, m in linear_modules(model).items() if n not in tied})
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        for b in token_batches(split, pad_id, rows, batch_size):
            hooks.keep = b["attention_mask"].bool()
            model(**{k: v.to(dev) for k, v in b.items()})
    finally:
        grams = hooks.result(reduce)
        model.train(was)
    return {n: g.cpu() for n, g in grams.items()}


def domain_perplexity(model: nn.Module, splits: Mapping[str, LMSplit], pad_id: int, vocab_size: int | None = None) -> dict[str, float]:
    """``{domain: perplexity of model on that split}``."""
    return {name: perplexity(model, s, pad_id, vocab_size=vocab_size) for name, s in splits.items()}


def perplexity_evaluator(model: nn.Module, splits: Mapping[str, LMSplit], pad_id: int, vocab_size: int | None = None):
    """An evaluator for the search methods: a state dict -> minus the mean perplexity over ``splits`` (higher is
    better). Each call loads the state dict into one working copy of ``model``."""
    work = copy.deepcopy(model)

    def evaluate(sd: Mapping[str, torch.Tensor]) -> float:
        work.load_state_dict(sd)
        ppl = domain_perplexity(work, splits, pad_id, vocab_size)
        return -sum(ppl.values()) / len(ppl)

    return evaluate


def merge_lms(
    method: str,
    models: Sequence[nn.Module],
    *,
    base: nn.Module | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any] | None] | None = None,
    train: Sequence[LMSplit] | None = None,
    val: Mapping[str, LMSplit] | None = None,
    pad_id: int = 0,
    vocab_size: int | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    base_label: str = "the base",
) -> tuple[nn.Module, dict[str, Any]]:
    """``(merged causal LM, info)``.

    ``train[i]``: model i's own training text (RegMean's Grams); ``val``: ``{domain: validation split}`` (the
    search methods' score, minus the mean perplexity). Tensor-level methods need neither."""
    check_lm_method(method)
    m = MERGE_METHODS.get(method)
    params = dict(parameters or {})
    if m.level == "tensor":
        return merge_models(method, models, base=base, parameters=params, model_parameters=model_parameters,
                            seed=seed, labels=labels, base_label=base_label)
    if m.base == "required" and base is None:
        raise AttarError(f"merge method {method!r} needs a base model.")
    opts = MERGE_METHODS.parse(m.name, params).model_dump(by_alias=True, exclude_unset=True)
    sds = state_dicts(models)
    names = list(labels) if labels is not None else [f"models[{i}]" for i in range(len(models))]
    check_state_dicts(sds[0], sds[1:], names[1:], names[0])
    ref = models[0]  # every input has one architecture
    default = float(opts.get("weight", 1.0))
    weights = [float((mp or {}).get("weight", default)) for mp in (model_parameters or [None] * len(models))]
    if m.name == "regmean":
        if train is None or len(train) != len(models):
            raise AttarError("regmean needs each model's own training text (one split per model).")
        o = m.options | opts
        grams = [lm_grams(x, t, pad_id, rows=o["examples"], batch_size=o["batch_size"], reduce=o["reduce"])
                 for x, t in zip(models, train)]
        result = regmean_merge(sds, grams, alpha=o["alpha"], weights=weights)
    else:
        if not val:
            raise AttarError(f"merge method {method!r} scores candidates on validation text; the merged stages "
                             "have none (give their data a val split).")
        evaluate = perplexity_evaluator(ref, val, pad_id, vocab_size)
        if m.name == "greedy_soup":
            result = greedy_soup(sds, evaluate)
        elif m.name == "wise_ft":
            if base is None or len(models) != 1:
                raise AttarError("wise_ft takes the pretrained model as base and exactly one fine-tuned model.")
            base_sd = state_dicts([base])[0]
            check_state_dicts(base_sd, sds, names, base_label)
            result = wise_ft_sweep(base_sd, sds[0], evaluate=evaluate, **opts)
        else:
            result = lcsc_search(sds, evaluate, **({"seed": seed} | opts))
    for name, t in result.state_dict.items():
        check_finite(name, t, t, lambda: {n: sd[name] for n, sd in zip(names, sds)})
    out = copy.deepcopy(ref)
    out.load_state_dict(result.state_dict)
    return out, {"method": m.name, **result.info}
