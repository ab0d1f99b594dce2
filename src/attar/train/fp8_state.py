"""Optimizer moments stored in FP8 (E4M3) with per-group scaling and dynamic range expansion (COAT, Xi et al. 2024).

Why: AdamW keeps two float32 moments per weight (8 bytes), often more than the weights and gradients together.
Stored as float8_e4m3fn in groups of ``group`` values with a float32 scale per group they take ~1.1 bytes each.

Why the expansion: E4M3 covers a range (largest / smallest normal) of 448 / 2^-6 = 28672, but a group of moments
often spans far less (second moments bunch up) or far more (tiny entries round to zero, and AdamW then divides by
``sqrt(0) + eps``). COAT maps each group through ``f(x) = sign(x) |x / c|^k`` before quantizing, with ``c`` the
geometric mean of the group's largest and smallest non-zero magnitudes and ``k`` chosen so the group's range lands
exactly on E4M3's normal range; every non-zero value is then a normal FP8 number, whose relative rounding error is at
most 2^-4, i.e. at most ``(1 + 2^-4)^(1/k) - 1`` after undoing ``f`` (:func:`error_bound`). Zeros stay zero.

Everything here computes in float32; the stored tensors are real ``torch.float8_e4m3fn`` (a storage dtype on CPU),
so the bytes measured are the bytes a GPU run would hold. Real FP8 kernels are a GPU matter and not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FP8_MIN_NORMAL = float(torch.finfo(FP8).smallest_normal)  # 2^-6
#: relative rounding error of a normal E4M3 number (3 mantissa bits: half an ulp is 2^-4 of the leading bit)
FP8_REL_ERROR = 2.0**-4
_K_MAX = 32.0  # a group whose values are (nearly) equal needs no more expansion than this


@dataclass
class Packed:
    """One tensor in FP8: ``codes`` [groups, group] float8, ``meta`` [groups, 3] float32 (scale, k, centre)."""

    codes: torch.Tensor
    meta: torch.Tensor
    numel: int
    shape: tuple[int, ...]


def quantize(x: torch.Tensor, group: int = 128, expansion: bool = True) -> Packed:
    """``x`` (any shape, float) as FP8 codes per group of ``group`` values; ``expansion``: COAT's dynamic range
    expansion (otherwise plain per-group absmax scaling, ``k = 1``)."""
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = (-n) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, group)
    a = g.abs()
    amax = a.amax(1, keepdim=True)
    nonzero = amax > 0
    if expansion:
        amin = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(1, keepdim=True)
        amin = torch.where(nonzero, amin, torch.ones_like(amin))
        amax_ = torch.where(nonzero, amax, torch.ones_like(amax))
        log_r = torch.log(amax_ / amin)
        k = torch.where(log_r > 0, math.log(FP8_MAX / FP8_MIN_NORMAL) / log_r.clamp_min(1e-30),
                        torch.full_like(log_r, _K_MAX)).clamp(max=_K_MAX)
        centre = torch.exp(0.5 * (torch.log(amax_) + torch.log(amin)))  # sqrt(amax * amin) without underflow
        y = g.sign() * (a / centre).pow(k)
        scale = (amax_ / centre).pow(k) / FP8_MAX
    else:
        k = torch.ones_like(amax)
        centre = torch.ones_like(amax)
        y = g
        scale = torch.where(nonzero, amax / FP8_MAX, torch.ones_like(amax))
    codes = (y / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return Packed(codes, torch.cat([scale, k, centre], 1), n, tuple(x.shape))


def dequantize(p: Packed, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 values ``p`` stands for (into ``out`` when given)."""
    scale, k, centre = p.meta[:, 0:1], p.meta[:, 1:2], p.meta[:, 2:3]
    y = p.codes.float() * scale
    x = y.sign() * centre * y.abs().pow(1.0 / k)
    x = x.reshape(-1)[: p.numel].view(p.shape)
    if out is None:
        return x
    return out.copy_(x)


def error_bound(p: Packed) -> torch.Tensor:
    """Per group: the largest relative error a non-zero value of it can have after a round trip (the FP8 rounding
    error 2^-4 carried through ``f``'s inverse); valid when the expansion put every value in the normal range."""
    inv_k = 1.0 / p.meta[:, 1]
    return torch.maximum((1 + FP8_REL_ERROR) ** inv_k - 1, 1 - (1 - FP8_REL_ERROR) ** inv_k)


def packed_bytes(p: Packed) -> int:
    return p.codes.numel() * p.codes.element_size() + p.meta.numel() * p.meta.element_size()
