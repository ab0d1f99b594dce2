"""Arcee Fusion: take the other model's value only where it changed the base the most, the base's elsewhere.

Per tensor, with b the base and m the other model (the softmax over the last axis, so one row of a
matrix is one distribution; a 1-D tensor is one row):

    kl    = Σ_last p · log(p / q),   p = softmax(m) + 1e-8,  q = softmax(b) + 1e-8   (one value per row)
    s     = |m − b| · kl                                     (importance of each entry)
    τ     = Q₂(s) + 1.5 · (Q₃(s) − Q₁(s))                    (the upper Tukey fence of s over the tensor)
    merged = b + (m − b) · [s ≥ τ]

so only the outlying changes, in rows whose output distribution moved, are fused in. The quartiles are
order statistics, Qₖ = the ⌊qₖ·(n − 1)⌋-th smallest of the n entries (q = 0.25, 0.5, 0.75), as mergekit
takes them. mergekit estimates them from a random sample of 10⁶ entries on larger tensors; attar takes the
exact order statistics there (``kthvalue``, no sort), so on tensors over 10⁶ entries the two may pick a
slightly different threshold. (mergekit's ``arcee_fusion``.)
"""

from __future__ import annotations

import torch

from attar.errors import AttarError
from attar.merge.methods.base import MergeMethod, TensorInputs, register
from attar.registry import Params

_EPS = 1e-8


def fusion_importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|other − base| times the KL divergence of each row's softmax (other ‖ base)."""
    p = torch.softmax(other, dim=-1) + _EPS
    q = torch.softmax(base, dim=-1) + _EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁), each quartile the ⌊q·(n − 1)⌋-th smallest score (0-based)."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, q2, q3 = (torch.kthvalue(flat, k + 1).values for k in (last // 4, last // 2, 3 * last // 4))
    return q2 + 1.5 * (q3 - q1)


def arcee_fusion_tensors(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if base.numel() == 0:
        return base.clone()
    scores = fusion_importance(other, base)
    mask = (scores >= fusion_threshold(scores)).to(base.dtype)
    return base + (other - base) * mask


def arcee_fusion(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    if len(x.models) != 1:  # run_merge checks this up front; merge_state_dicts reaches here
        raise AttarError(f"arcee_fusion fuses exactly one model into the base; got {len(x.models)} besides the base. "
                         "Merge them pairwise, or use ties / ram for more.")
    return arcee_fusion_tensors(x.base, x.models[0])


class ArceeFusionParams(Params):
    """No parameters: the threshold is set by each tensor's own importance quartiles."""


register(
    MergeMethod(
        name="arcee_fusion",
        summary="the other model's entries whose importance |Δ|·KL(row) is above the upper Tukey fence, the base's elsewhere",
        fn=arcee_fusion,
        min_models=1,
        max_models=1,
        Params=ArceeFusionParams,
        reference="https://arcee.ai",
    )
)
