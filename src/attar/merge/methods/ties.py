"""TIES-merging: trim each task vector by magnitude, elect a sign per entry, average the agreeing ones.

(Yadav et al., 2023.) Weights scale task vectors before the sign election, as in
mergekit, so results agree with mergekit's ``ties``.
"""

from __future__ import annotations

import torch

from attar.merge.methods.base import MergeMethod, TensorInputs, combine_deltas, magnitude_mask, register, rescale_kept


def ties(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    deltas = []
    for t, p in zip(x.models, x.params):
        delta = t - x.base
        density = float(p["density"])
        deltas.append(rescale_kept(delta, magnitude_mask(delta, density), density, x.options["rescale"], random=False))
    mixed = combine_deltas(
        deltas,
        [float(p["weight"]) for p in x.params],
        consensus=True,
        normalize=bool(x.options["normalize"]),
        lam=float(x.options["lambda"]),
    )
    return x.base + mixed


register(
    MergeMethod(
        name="ties",
        summary="trim task vectors by magnitude (density), elect sign, disjoint mean",
        fn=ties,
        model_params={"weight": 1.0, "density": 1.0},
        options={"normalize": True, "lambda": 1.0, "rescale": False},
        reference="https://arxiv.org/abs/2306.01708",
    )
)
