"""LCSC-style checkpoint combination: θ = Σ c_i θ_i with coefficients found by evolutionary search.

(Liu et al., 2024, "Linear Combination of Saved Checkpoints".) A simple
(1+λ) evolution strategy: start from the last checkpoint (c = e_n), perturb the
coefficients with Gaussian noise, keep a child only if its held-out score is
strictly better. Coefficients are renormalised to sum to 1 by default so the
search moves along the affine hull of the checkpoints. Seeded, so reproducible.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from attar.errors import AttarError
from attar.merge.methods._state import check_same_keys, weighted_average
from attar.merge.methods.base import Evaluator, MergeMethod, StateDict, register
from attar.merge.methods.params import F32_MAX
from attar.merge.methods.soup import ModelMergeResult
from attar.registry import Params


def lcsc_search(
    checkpoints: Sequence[StateDict],
    evaluate: Evaluator,
    *,
    iterations: int = 20,
    population: int = 4,
    sigma: float = 0.2,
    init: Literal["last", "uniform"] = "last",
    sum_to_one: bool = True,
    seed: int = 0,
) -> ModelMergeResult:
    check_same_keys(checkpoints, "checkpoint")
    n = len(checkpoints)
    if iterations < 0 or population < 1:
        raise AttarError("lcsc needs iterations >= 0 and population >= 1.")
    g = torch.Generator().manual_seed(seed)
    best = torch.zeros(n, dtype=torch.float64)
    if init == "last":
        best[-1] = 1.0
    else:
        best[:] = 1.0 / n

    def score(c: torch.Tensor) -> float:
        return float(evaluate(weighted_average(checkpoints, c.tolist(), normalize=False)))

    best_score = score(best)
    history = [{"iteration": 0, "score": best_score, "coefficients": best.tolist()}]
    for it in range(1, iterations + 1):
        for _ in range(population):
            child = best + sigma * torch.randn(n, generator=g, dtype=torch.float64)
            if sum_to_one:
                s = child.sum()
                if abs(float(s)) < 1e-8:
                    continue
                child = child / s
            child_score = score(child)
            if child_score > best_score:
                best, best_score = child, child_score
        history.append({"iteration": it, "score": best_score, "coefficients": best.tolist()})
    merged = weighted_average(checkpoints, best.tolist(), normalize=False)
    return ModelMergeResult(merged, {"coefficients": best.tolist(), "score": best_score, "history": history})


def _run(state_dicts: Sequence[StateDict], *, evaluate: Evaluator, **opts: Any) -> ModelMergeResult:
    return lcsc_search(state_dicts, evaluate, **opts)


class LcscParams(Params):
    iterations: int = Field(20, ge=0, le=10**6, description="search iterations (a whole number)")
    population: int = Field(4, ge=1, le=10**6, description="children per iteration (a whole number)")
    sigma: float = Field(0.2, gt=0.0, le=F32_MAX, description="the search's step size")
    init: Literal["last", "uniform"] = Field("last", description="start from the last checkpoint or the uniform average")
    sum_to_one: bool = Field(True, description="renormalise the coefficients to sum to 1")
    seed: int = Field(0, description="seeds the search (a merge stage uses the stage's seed)")


register(
    MergeMethod(
        name="lcsc",
        summary="linear combination of saved checkpoints, coefficients by evolutionary search (needs data)",
        level="model",
        run=_run,
        base="none",
        min_models=2,
        Params=LcscParams,
        reference="https://arxiv.org/abs/2404.02241",
    )
)
