"""Model Breadcrumbs: drop the largest outliers (gamma) and the smallest entries of each task vector.

(Davari & Belilovsky, 2023.) Same parameters and rules as mergekit's
``breadcrumbs`` and ``breadcrumbs_ties``.
"""

from __future__ import annotations

import torch

from attar.merge.methods.base import MergeMethod, TensorInputs, combine_deltas, outlier_mask, register, rescale_kept


def _breadcrumbs(x: TensorInputs, consensus: bool) -> torch.Tensor:
    assert x.base is not None
    deltas = []
    for t, p in zip(x.models, x.params):
        delta = t - x.base
        density = float(p["density"])
        mask = outlier_mask(delta, density, float(p["gamma"]))
        deltas.append(rescale_kept(delta, mask, density, x.options["rescale"], random=False))
    mixed = combine_deltas(
        deltas,
        [float(p["weight"]) for p in x.params],
        consensus=consensus,
        normalize=bool(x.options["normalize"]),
        lam=float(x.options["lambda"]),
    )
    return x.base + mixed


def breadcrumbs(x: TensorInputs) -> torch.Tensor:
    return _breadcrumbs(x, consensus=False)


def breadcrumbs_ties(x: TensorInputs) -> torch.Tensor:
    return _breadcrumbs(x, consensus=True)


_PARAMS = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
_OPTIONS = {"normalize": False, "lambda": 1.0, "rescale": False}

register(
    MergeMethod(
        name="breadcrumbs",
        summary="drop outliers (gamma) and small entries of task vectors, then task arithmetic",
        fn=breadcrumbs,
        model_params=dict(_PARAMS),
        options=dict(_OPTIONS),
        reference="https://arxiv.org/abs/2312.06795",
    )
)
register(
    MergeMethod(
        name="breadcrumbs_ties",
        summary="breadcrumbs sparsification with TIES sign election",
        fn=breadcrumbs_ties,
        model_params=dict(_PARAMS),
        options=dict(_OPTIONS),
        reference="https://arxiv.org/abs/2312.06795",
    )
)
