"""Merge in-memory models by method name: what a recipe ``merge`` stage calls.

Tensor-level methods (linear, task_arithmetic, ties, dare_*, slerp, ...) run the
engine's per-tensor code on the models' state dicts; model-level methods get
their callbacks from the stage's data: ``greedy_soup``, ``wise_ft`` and ``lcsc``
score candidates on the validation split, ``fisher`` estimates each model's
diagonal Fisher on training rows, ``regmean``/``regmean_plusplus`` take each model's input Grams on
its own training rows, ``adamerging`` learns its coefficients on each task's unlabeled inputs. The result is a model with the architecture
of the reference input (the base when the method takes one, else the first model).
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from attar.errors import AttarError
from attar.merge.config import IGNORED_PARAMS, check_settings
from attar.merge.engine import merge_state_dicts
from attar.merge.evaluators import evaluator_for, fisher_estimator, state_dicts
from attar.merge.methods import (MERGE_METHODS, adamerging_merge, fisher_merge, greedy_soup, input_grams, lcsc_search,
                                 regmean_merge, regmean_plusplus_merge, wise_ft_sweep)
from attar.merge.validate import check_finite, check_state_dicts
from attar.rng import generator


def merge_models(
    method: str,
    models: Sequence[nn.Module],
    *,
    base: nn.Module | None = None,
    bundle: Any = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any] | None] | None = None,
    seed: int = 0,
    labels: Sequence[str] | None = None,
    base_label: str = "the base",
    data: Sequence[Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(merged model, info)``. ``bundle`` (a DataBundle) is needed by the model-level methods.

    ``parameters`` are the method's shared parameters (as in a mergekit config's
    global ``parameters``); for ``fisher`` also ``examples``, ``labels`` and
    ``batch_size`` of the Fisher estimate. ``model_parameters[i]`` are per-model
    (``weight``, ``density``, ...). ``labels`` name the models (and ``base_label`` the base) in errors.
    ``data[i]`` (a DataBundle) is model i's own data (RegMean's Grams, AdaMerging's unlabeled inputs);
    by default every model uses ``bundle``.
    """
    m = MERGE_METHODS.get(method)
    params = dict(parameters or {})
    if not models:
        raise AttarError(f"merge method {method!r} needs at least one model.")
    if m.base == "required" and base is None:
        raise AttarError(f"merge method {method!r} needs a base model.")
    if m.base == "none" and base is not None and m.name != "wise_ft":
        raise AttarError(f"merge method {method!r} takes no base model; list every model under models.")
    ref = base if (base is not None and not m.base_is_input) else models[0]
    out = copy.deepcopy(ref)
    check_settings(m, "parameters", params, shared=True)
    for i, mp in enumerate(model_parameters or []):
        check_settings(m, f"model_parameters[{i}]", mp, shared=False)
    sds = state_dicts(models)
    base_sd = None if base is None else state_dicts([base])[0]
    names = list(labels) if labels is not None else [f"models[{i}]" for i in range(len(models))]
    everything = ([(base_label, base_sd)] if base_sd is not None else []) + list(zip(names, sds))
    check_state_dicts(everything[0][1], [sd for _, sd in everything[1:]], [n for n, _ in everything[1:]], everything[0][0])
    if m.level == "tensor":
        merged = merge_state_dicts(m, sds, base_sd, parameters=params, model_parameters=model_parameters, seed=seed)
        out.load_state_dict(merged)
        return out, {"method": m.name}
    # Model-level methods take plain values (no gradients or filters): the validated ones, defaults left to the method.
    params = {k: v for k, v in params.items() if k not in IGNORED_PARAMS}
    params = MERGE_METHODS.parse(m.name, params).model_dump(by_alias=True, exclude_unset=True)
    if bundle is None:
        raise AttarError(f"merge method {m.name!r} needs data (held-out scores or Fisher estimates); give the stage data.")
    own = list(data) if data is not None else [bundle] * len(models)
    if len(own) != len(models):
        raise AttarError(f"got {len(own)} data sets for {len(models)} models; give one per model.")
    default = params.get("weight", 1.0)
    weights = [float((mp or {}).get("weight", default)) for mp in (model_parameters or [None] * len(models))]
    if m.name in ("regmean", "regmean_plusplus"):
        opts = m.options | params
        rows = [_rows(b.train.x, opts["examples"], seed, i) for i, b in enumerate(own)]
        kw = dict(alpha=opts["alpha"], weights=weights)
        if m.name == "regmean":
            grams = [input_grams(x, r, batch_size=opts["batch_size"], max_examples=opts["examples"], reduce=opts["reduce"])
                     for x, r in zip(models, rows)]
            result = regmean_merge(sds, grams, **kw)
        else:
            result = regmean_plusplus_merge(models, rows, examples=opts["examples"], batch_size=opts["batch_size"],
                                            reduce=opts["reduce"], blocks=opts["blocks"], **kw)
    elif m.name == "adamerging":
        opts = m.options | params
        tasks = list({id(b): getattr(b, opts["split"]).x for b in own}.values())  # one task per distinct data set
        if any(len(x) == 0 for x in tasks):
            raise AttarError(f"adamerging: a data set has an empty {opts['split']} split; choose another `split`.")
        result = adamerging_merge(ref, base_sd, sds, tasks, mode=opts["mode"], init=opts["init"], lr=opts["lr"],
                                  steps=opts["steps"], batch_size=opts["batch_size"], clamp=opts["clamp"], seed=seed)
    elif m.name == "fisher":
        opts = m.options | params
        est = fisher_estimator(bundle.train.x, bundle.train.y, labels=opts["labels"], max_examples=opts["examples"],
                               batch_size=opts["batch_size"], seed=seed)
        result = fisher_merge(sds, [est(x) for x in models], weights=weights, fisher_floor=opts["fisher_floor"])
    else:
        evaluate = evaluator_for(ref, bundle, "val")
        if m.name == "greedy_soup":
            result = greedy_soup(sds, evaluate)
        elif m.name == "wise_ft":
            if base is None or len(models) != 1:
                raise AttarError("wise_ft takes the zero-shot model as base and exactly one fine-tuned model.")
            result = wise_ft_sweep(base_sd, sds[0], evaluate=evaluate, **params)
        elif m.name == "lcsc":
            result = lcsc_search(sds, evaluate, **({"seed": seed} | params))
        else:  # a model-level method registered later
            result = m.run(sds, base=base_sd, evaluate=evaluate, **params)
    for name, t in result.state_dict.items():
        check_finite(name, t, t, lambda: {n: sd[name] for n, sd in everything})
    out.load_state_dict(result.state_dict)
    return out, {"method": m.name, **result.info}


def _rows(x: torch.Tensor, n: int, seed: int, index: int) -> torch.Tensor:
    """``n`` rows of ``x`` in a seeded random order (all of them when there are fewer)."""
    return x[torch.randperm(len(x), generator=generator(seed, "regmean rows", index))[:n]]
