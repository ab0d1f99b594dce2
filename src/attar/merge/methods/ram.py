"""RAM and RAM+ (Reinforced Agent Merging, arXiv:2601.13572), as mergekit's ``ram`` and ``ramplus_tl``.

Task vectors τᵢ = θᵢ − base of models fine-tuned by RL are sparse, and averaging dilutes an update that only
one model made. RAM counts, per entry, how many models changed it (|τᵢ| > ``epsilon``): an entry changed by
exactly one model keeps that model's full update; one changed by c ≥ 2 models gets their mean; entries no model
changed keep the base:

    merged = base + Σᵢ [|τᵢ| > ε] · τᵢ · (1 if c = 1 else 1/c)

``ramplus_tl`` (RAM+, tensor-local) also scales each model's unique updates by λᵢ = 1 + r · clamp(ρᵢ, 0, α),
where ρᵢ = (entries model i shares with another model) / (entries only model i changed), counted within the
tensor, so a model whose updates mostly overlap others' has its few unique ones boosted. Model weights play
no part (mergekit ignores them too).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.merge.methods.params import F32_MAX
from attar.registry import Params


def _ram_parts(base: torch.Tensor, models: list[torch.Tensor], epsilon: float):
    """Task vectors zeroed where |τ| ≤ ε, which models changed each entry, and the per-entry counts c."""
    taus = torch.stack([m - base for m in models]).reshape(len(models), -1)
    changed = taus.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return taus * changed, changed, counts


def ram_tensors(base: torch.Tensor, models: list[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    if not models:
        return base
    taus, _, counts = _ram_parts(base, models, epsilon)
    merged = (taus * (counts == 1) + taus * (counts > 1) / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ramplus_tensors(base: torch.Tensor, models: list[torch.Tensor], r: float = 0.1, alpha: float = 0.2,
                    epsilon: float = 1e-5) -> torch.Tensor:
    if not models:
        return base
    taus, changed, counts = _ram_parts(base, models, epsilon)
    unique, shared = counts == 1, counts > 1
    n_shared = (changed & shared).sum(dim=1)
    n_unique = (changed & unique).sum(dim=1)
    # mergekit divides by max(U, epsilon): with no unique entries ρ is large, but then λ scales nothing
    rho = n_shared / n_unique.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (taus * unique * lam.unsqueeze(-1) + taus * shared / counts.clamp(min=1)).sum(dim=0)
    return base + merged.reshape(base.shape)


def ram(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    return ram_tensors(x.base, x.models, float(x.options["epsilon"]))


def ramplus_tl(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    o = x.options
    return ramplus_tensors(x.base, x.models, float(o["r"]), float(o["alpha"]), float(o["epsilon"]))


Epsilon = Annotated[float, Field(ge=0.0, le=F32_MAX, description="|θ − base| above which a model counts as having changed an entry")]


class RamParams(Params):
    epsilon: Epsilon = 1e-5


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0.0, le=F32_MAX, description="how strongly unique updates are boosted: λ = 1 + r·clamp(ρ, 0, alpha)")
    alpha: float = Field(0.2, ge=0.0, le=F32_MAX, description="the cap on ρ (shared / unique entries of a model) in the boost")


register(MergeMethod(
    name="ram",
    summary="entries one model changed keep its full update, entries several changed get their mean",
    fn=ram,
    min_models=1,
    Params=RamParams,
    reference="https://arxiv.org/abs/2601.13572",
))
register(MergeMethod(
    name="ramplus_tl",
    summary="RAM with each model's unique updates scaled by 1 + r·clamp(shared/unique, 0, alpha), per tensor",
    fn=ramplus_tl,
    min_models=1,
    Params=RamPlusParams,
    reference="https://arxiv.org/abs/2601.13572",
))
