"""DELLA (Deep, Drop-and-rescale via magnitude-based sampling; Deep et al. 2024), as mergekit's ``della``.

Each task vector τ = θ − base is pruned at random, but not uniformly as in DARE: within each row (the
last axes of a tensor, ranked along axis 1; a 1-D tensor is one row), the entry of magnitude rank r of n
(r = 1 the smallest) is kept with probability

    pᵣ = (density − epsilon) + 2·epsilon · (r − 1)/(n − 1)

so larger entries survive more often and the mean keep rate is ``density``. What is kept is rescaled
(``rescale: true`` = match the L1 norm of τ, mergekit's rule; ``l2``, ``linf``, ``false``), then merged as
TIES does (``della``: sign election and disjoint mean, ``normalize: true``) or summed (``della_linear``);
``lambda`` scales the result. density ± epsilon must lie inside (0, 1).
Randomness is seeded by (config seed, tensor name, model index), as DARE's is.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import torch
from pydantic import Field

from attar.errors import AttarError
from attar.merge.methods.base import MergeMethod, TensorInputs, combine_deltas, register, rescale_kept
from attar.merge.methods.params import PER_MODEL, Density, Lambda, Rescale, Weight
from attar.registry import Params

Epsilon = Annotated[float, Field(ge=0.0, lt=1.0, description="half-width of the keep-probability window around density"), PER_MODEL]


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Each entry's keep probability, from its magnitude rank within its row (shape of ``delta``)."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).float() + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    spread = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(delta.shape)


def della_prune(delta: torch.Tensor, density: float, epsilon: float, rescale: Any, generator: torch.Generator,
                name: str = "") -> torch.Tensor:
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise AttarError(f"della of {name!r}: density {density:g} ± epsilon {epsilon:g} must lie inside (0, 1); "
                         "lower epsilon (or move density away from 0 and 1).")
    probs = della_keep_probabilities(delta, density, epsilon)
    mask = torch.bernoulli(probs, generator=generator).bool()
    return rescale_kept(delta, mask, density, rescale, random=False)


def della(x: TensorInputs, consensus: bool) -> torch.Tensor:
    assert x.base is not None
    deltas = [della_prune(m - x.base, float(p["density"]), float(p["epsilon"]), x.options["rescale"], x.generator(i), x.name)
              for i, (m, p) in enumerate(zip(x.models, x.params))]
    mixed = combine_deltas(deltas, [float(p["weight"]) for p in x.params], consensus=consensus,
                           normalize=bool(x.options["normalize"]), lam=float(x.options["lambda"]))
    return x.base + mixed


class DellaLinearParams(Params):
    weight: Weight = 1.0
    density: Density = 1.0
    epsilon: Epsilon = 0.15
    lambda_: Lambda = 1.0
    normalize: bool = Field(False, description="divide by the summed weights")
    rescale: Rescale = Field(True, description="after pruning: true (match the L1 norm, mergekit's rule), false, l1, l2, linf, density")


class DellaParams(DellaLinearParams):
    normalize: bool = Field(True, description="divide by the summed weights of the models that agree with the elected sign")


for _name, _params, _consensus, _summary in (
    ("della", DellaParams, True, "magnitude-ranked random drop (density ± epsilon), rescale, TIES sign election"),
    ("della_linear", DellaLinearParams, False, "magnitude-ranked random drop (density ± epsilon), rescale, weighted sum"),
):
    register(MergeMethod(name=_name, summary=_summary, fn=partial(della, consensus=_consensus), Params=_params,
                         reference="https://arxiv.org/abs/2406.11617"))
