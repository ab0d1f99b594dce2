"""Task arithmetic: base + λ·Σ w_i (θ_i − base) (Ilharco et al., 2023)."""

from __future__ import annotations

import torch

from attar.merge.methods.base import MergeMethod, TensorInputs, combine_deltas, register


def task_arithmetic(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    deltas = [t - x.base for t in x.models]
    mixed = combine_deltas(
        deltas,
        [float(p["weight"]) for p in x.params],
        consensus=False,
        normalize=bool(x.options["normalize"]),
        lam=float(x.options["lambda"]),
    )
    return x.base + mixed


register(
    MergeMethod(
        name="task_arithmetic",
        summary="base + lambda * sum of weighted task vectors",
        fn=task_arithmetic,
        model_params={"weight": 1.0},
        options={"normalize": False, "lambda": 1.0},
        reference="https://arxiv.org/abs/2212.04089",
    )
)
