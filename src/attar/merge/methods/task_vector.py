"""One task-vector method: base + λ·combine(sparsify(θᵢ − origin)), with the named methods as presets.

As in mergekit's generalised task arithmetic, task arithmetic, TIES, DARE, Model Breadcrumbs and
fine-tuning transfer differ only in three choices, so they are one function here:

* **sparsify** each task vector τᵢ = θᵢ − origin: ``none``; ``magnitude`` (TIES: keep the ``density``
  largest |τ|); ``random`` (DARE: keep each entry with probability ``density``); ``breadcrumbs``
  (drop the ``gamma`` largest outliers and the smallest entries, keeping ``density``); then
  ``rescale`` what is kept;
* **consensus**: ``none`` (sum the weighted vectors) or ``sign`` (TIES: elect each entry's sign from the
  weighted sum, keep only the agreeing entries);
* **normalize** (divide by the summed weights of the contributors) and **lambda** (scale the sum).

The origin is the base, or ``old_base`` for fine-tuning transfer (τ from an older base, added to a new one).
``task_vector`` exposes every choice; each preset fixes sparsify and consensus, keeps its paper's defaults
and parameters, and gives the same result as ``task_vector`` configured alike (tested).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from pydantic import Field

from attar.merge.methods.base import (
    MergeMethod,
    TensorInputs,
    combine_deltas,
    magnitude_mask,
    outlier_mask,
    random_mask,
    register,
    rescale_kept,
)
from attar.merge.methods.params import Density, Gamma, Lambda, Rescale, Weight
from attar.registry import Params

Sparsify = Literal["none", "magnitude", "random", "breadcrumbs"]
Consensus = Literal["none", "sign"]


# ---------------------------------------------------------------- the one method


def sparsify(delta: torch.Tensor, how: str, p: dict[str, Any], rescale: Any, generator: torch.Generator) -> torch.Tensor:
    """One task vector after sparsification ``how`` with its model's ``density`` (and ``gamma``)."""
    if how == "none":
        return delta
    density = float(p["density"])
    if how == "magnitude":
        mask = magnitude_mask(delta, density)
    elif how == "random":
        mask = random_mask(delta, density, generator)
    elif how == "breadcrumbs":
        mask = outlier_mask(delta, density, float(p["gamma"]))
    else:  # validated by Params; kept for safety
        raise ValueError(f"unknown sparsification {how!r}")
    return rescale_kept(delta, mask, density, rescale, random=how == "random")


def merge_task_vectors(x: TensorInputs, sparsify_how: str | None = None, consensus: str | None = None) -> torch.Tensor:
    """The one task-vector merge; ``sparsify_how``/``consensus`` fixed by a preset, else read from the options."""
    assert x.base is not None
    how = sparsify_how or x.options["sparsify"]
    origin = x.extras.get("old_base", x.base)
    deltas = [sparsify(t - origin, how, p, x.options.get("rescale"), x.generator(i))
              for i, (t, p) in enumerate(zip(x.models, x.params))]
    mixed = combine_deltas(
        deltas,
        [float(p["weight"]) for p in x.params],
        consensus=(consensus or x.options["consensus"]) == "sign",
        normalize=bool(x.options["normalize"]),
        lam=float(x.options["lambda"]),
    )
    return x.base + mixed


# ---------------------------------------------------------------- parameters and presets


class TaskVectorParams(Params):
    """Every task-vector preset: base + λ·Σ wᵢ·τᵢ (with ``normalize``: divided by Σ wᵢ)."""

    weight: Weight = 1.0
    lambda_: Lambda = 1.0
    normalize: bool = Field(False, description="divide by the summed weights (with sign election: of the agreeing models)")


class SparseParams(TaskVectorParams):
    density: Density = 1.0
    rescale: Rescale = False


class TiesParams(SparseParams):
    normalize: bool = Field(True, description="divide by the summed weights of the models that agree with the elected sign")


class DareParams(SparseParams):
    rescale: Rescale = True


class BreadcrumbsParams(SparseParams):
    gamma: Gamma = 0.01


class TransferParams(TaskVectorParams):
    old_base: str = Field(..., description="the old base (a model path): task vectors are fine-tune minus old base")


class GeneralParams(BreadcrumbsParams):
    sparsify: Sparsify = Field("none", description="none, magnitude (TIES), random (DARE) or breadcrumbs")
    consensus: Consensus = Field("none", description="none, or sign (TIES sign election)")
    old_base: str | None = Field(None, description="take task vectors from this model instead of the base (transfer)")


def _register(name: str, summary: str, params: type[TaskVectorParams], how: str | None, consensus: str | None,
              reference: str, **kw: Any) -> None:
    preset = "" if how is None else f" (task_vector with sparsify={how}, consensus={consensus})"
    register(MergeMethod(name=name, summary=summary + preset, Params=params, reference=reference,
                         fn=partial(merge_task_vectors, sparsify_how=how, consensus=consensus), **kw))


_register("task_vector", "base + lambda * combined task vectors: sparsify x consensus x rescale/normalize, all chosen",
          GeneralParams, None, None, "https://github.com/arcee-ai/mergekit", model_refs=("old_base",))
_register("task_arithmetic", "base + lambda * sum of weighted task vectors", TaskVectorParams, "none", "none",
          "https://arxiv.org/abs/2212.04089")
_register("ties", "trim task vectors by magnitude (density), elect sign, disjoint mean", TiesParams, "magnitude", "sign",
          "https://arxiv.org/abs/2306.01708")
_register("dare_linear", "random drop (1 - density) with rescale, then task arithmetic", DareParams, "random", "none",
          "https://arxiv.org/abs/2311.03099")
_register("dare_ties", "random drop (1 - density) with rescale, then TIES sign election", DareParams, "random", "sign",
          "https://arxiv.org/abs/2311.03099")
_register("breadcrumbs", "drop outliers (gamma) and small entries of task vectors, then task arithmetic",
          BreadcrumbsParams, "breadcrumbs", "none", "https://arxiv.org/abs/2312.06795")
_register("breadcrumbs_ties", "breadcrumbs sparsification with TIES sign election", BreadcrumbsParams, "breadcrumbs",
          "sign", "https://arxiv.org/abs/2312.06795")
_register("ft_transfer", "new base + (old fine-tuned - old base); old base given as parameter old_base", TransferParams,
          "none", "none", "https://arxiv.org/abs/2503.20110", model_refs=("old_base",))
