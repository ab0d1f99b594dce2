"""Karcher mean: the equal-weight Riemannian (spherical) mean of the models' tensors, by fixed-point iteration.

Every input (the base too, when given: it is one more model) is one vector vᵢ with norm nᵢ and direction
uᵢ = vᵢ/nᵢ; inputs with nᵢ ≤ ``tol`` are left out of the direction. With αᵢ = 1/n (renormalised over the kept
inputs), starting from m = Σ αᵢuᵢ / ‖Σ αᵢuᵢ‖, each step moves m along the mean of the log maps

    g = Σ αᵢ · θᵢ/sin θᵢ · (uᵢ − cos θᵢ · m),   θᵢ = arccos⟨m, uᵢ⟩  (terms with θᵢ < tol skipped)
    m ← cos‖g‖ · m + sin‖g‖ · g/‖g‖   (renormalised)

until ‖g‖ < ``tol`` or ``max_iter`` steps; the result is m · Σ αᵢnᵢ (αᵢ = 1/n over all inputs). One input is
returned as it is. (mergekit's ``karcher``.)
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.registry import Params


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for v in tensors:
        n = torch.linalg.vector_norm(v.to(dtype))
        norms.append(n)
        units.append(torch.zeros_like(v) if n.item() == 0.0 else (v / n).to(v.dtype))
    keep = [i for i, n in enumerate(norms) if n.item() > tol]
    if not keep:
        return sum(v * 0 for v in tensors)
    total = sum(alphas[i] for i in keep)
    a = [alphas[i] / total for i in keep]
    u = [units[i] for i in keep]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        g = torch.zeros_like(mean)
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            g += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
        g_norm = torch.linalg.vector_norm(g.to(dtype))
        if g_norm.item() < tol:
            break
        mean = (torch.cos(g_norm) * mean + torch.sin(g_norm) * (g / g_norm)).to(mean.dtype)
        n = torch.linalg.vector_norm(mean.to(dtype))
        if n.item() > tol:
            mean = (mean / n).to(mean.dtype)
    return sum(ai * ni for ai, ni in zip(alphas, norms)) * mean


def karcher(x: TensorInputs) -> torch.Tensor:
    n = len(x.models)
    return karcher_mean(x.models, [1.0 / n] * n, int(x.options["max_iter"]), float(x.options["tol"]))


class KarcherParams(Params):
    max_iter: int = Field(10, ge=0, le=10_000, description="the most fixed-point steps")
    tol: float = Field(1e-5, gt=0.0, le=1.0, description="stop when the mean log map is shorter than this")


register(
    MergeMethod(
        name="karcher",
        summary="equal-weight spherical (Karcher) mean of the models, by fixed-point iteration",
        fn=karcher,
        base="optional",
        base_is_input=True,
        min_models=1,
        Params=KarcherParams,
        reference="https://arxiv.org/abs/2603.04972",
    )
)
