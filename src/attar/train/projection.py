"""Low-rank gradient projection (GaLore, Zhao et al. 2024): Adam's moments live in an r-dimensional subspace.

Why: for an ``m x n`` weight, Adam keeps ``2 m n`` moment values. GaLore projects the gradient ``G`` onto its top-r
singular vectors (``R = P^T G`` with ``P`` the first r left singular vectors when ``m <= n``; ``R = G Q^T`` with the
first r right ones otherwise), runs Adam on ``R`` (moments of ``r x n`` or ``m x r``) and maps the update back
(``P N`` / ``N Q``). The basis is refreshed from the current gradient every ``update_every`` steps; the moments are
kept across a refresh, as in GaLore. Any tensor of two or more dimensions is a matrix here (a conv kernel
``[out, in, kh, kw]`` is ``out x in*kh*kw``).

Rank at or above ``min(m, n)`` saves nothing, so such tensors are not projected at all and train with plain AdamW
(a full-rank projection would only rotate the coordinates Adam normalises in, and Adam is not rotation invariant,
so it would be a different optimizer, not the same one).
"""

from __future__ import annotations

import torch


def matrix_shape(p: torch.Tensor) -> tuple[int, int] | None:
    """``(m, n)`` a tensor is projected as, or None for vectors and scalars."""
    if p.dim() < 2:
        return None
    return p.shape[0], p.numel() // p.shape[0]


def projects(p: torch.Tensor, rank: int) -> bool:
    """True when a rank-``rank`` projection of ``p``'s gradient saves memory (a matrix with both sides > rank)."""
    mn = matrix_shape(p)
    return mn is not None and rank < min(mn)


def left_side(m: int, n: int) -> bool:
    """GaLore's choice: project the shorter side (left singular vectors when ``m <= n``)."""
    return m <= n


def basis(g: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-``rank`` singular vectors of matrix ``g`` on its projected side: ``[m, r]`` (left) or ``[r, n]``."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return u[:, :rank].contiguous() if left_side(*g.shape) else vh[:rank].contiguous()


def project(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``P^T G`` ([r, n]) or ``G Q^T`` ([m, r])."""
    return p.t() @ g if left_side(*g.shape) else g @ p.t()


def project_back(n: torch.Tensor, p: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The projected update mapped back to the ``shape`` matrix: ``P N`` or ``N Q``."""
    return p @ n if left_side(*shape) else n @ p
