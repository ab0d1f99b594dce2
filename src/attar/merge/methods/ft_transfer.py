"""Fine-tuning transfer: new base + λ·Σ w_i (old fine-tuned_i − old base).

(Lin et al., 2025, "Efficient Model Development through Fine-tuning Transfer".)
The config's ``base_model`` is the *new* base, ``models`` are fine-tunes of the
*old* base, and the old base is named by the ``old_base`` parameter. Works best
when the two bases are linearly connected (e.g. successive releases).
"""

from __future__ import annotations

import torch

from attar.merge.methods.base import MergeMethod, TensorInputs, combine_deltas, register


def ft_transfer(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    old_base = x.extras["old_base"]
    diffs = [t - old_base for t in x.models]
    mixed = combine_deltas(
        diffs,
        [float(p["weight"]) for p in x.params],
        consensus=False,
        normalize=bool(x.options["normalize"]),
        lam=float(x.options["lambda"]),
    )
    return x.base + mixed


register(
    MergeMethod(
        name="ft_transfer",
        summary="new base + (old fine-tuned - old base); old base given as parameter old_base",
        fn=ft_transfer,
        model_params={"weight": 1.0},
        options={"normalize": False, "lambda": 1.0},
        model_refs=("old_base",),
        reference="https://arxiv.org/abs/2503.20110",
    )
)
