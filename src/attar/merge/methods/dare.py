"""DARE: randomly drop task-vector entries with probability p = 1 − density and rescale by 1/(1 − p).

(Yu et al., 2024, "Language Models are Super Mario".) Masks come from a
generator seeded by (run seed, tensor name, model index), so a merge is
reproducible and identical whether streamed or done in memory. ``dare_linear``
sums the sparsified task vectors; ``dare_ties`` adds TIES sign election.
"""

from __future__ import annotations

import torch

from attar.merge.methods.base import MergeMethod, TensorInputs, combine_deltas, random_mask, register, rescale_kept


def _dare(x: TensorInputs, consensus: bool) -> torch.Tensor:
    assert x.base is not None
    deltas = []
    for i, (t, p) in enumerate(zip(x.models, x.params)):
        delta = t - x.base
        density = float(p["density"])
        mask = random_mask(delta, density, x.generator(i))
        deltas.append(rescale_kept(delta, mask, density, x.options["rescale"], random=True))
    mixed = combine_deltas(
        deltas,
        [float(p["weight"]) for p in x.params],
        consensus=consensus,
        normalize=bool(x.options["normalize"]),
        lam=float(x.options["lambda"]),
    )
    return x.base + mixed


def dare_linear(x: TensorInputs) -> torch.Tensor:
    return _dare(x, consensus=False)


def dare_ties(x: TensorInputs) -> torch.Tensor:
    return _dare(x, consensus=True)


_PARAMS = {"weight": 1.0, "density": 1.0}
_OPTIONS = {"normalize": False, "lambda": 1.0, "rescale": True}

register(
    MergeMethod(
        name="dare_linear",
        summary="random drop (1 - density) with rescale, then task arithmetic",
        fn=dare_linear,
        model_params=dict(_PARAMS),
        options=dict(_OPTIONS),
        reference="https://arxiv.org/abs/2311.03099",
    )
)
register(
    MergeMethod(
        name="dare_ties",
        summary="random drop (1 - density) with rescale, then TIES sign election",
        fn=dare_ties,
        model_params=dict(_PARAMS),
        options=dict(_OPTIONS),
        reference="https://arxiv.org/abs/2311.03099",
    )
)
