"""Seeds derived from names, so every random draw in attar is a function of (seed, purpose, position).

Why: resume is exact only if the data order, augmentation, dropout and selection of step ``t`` can be
recomputed from integers alone, never from a generator's hidden state; and two parts of a run must not share
a stream by accident. ``seed_of(seed, "rs2", round)`` is stable across runs, platforms and Python versions
(sha256 of the parts' ``repr``, 60 bits).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def seed_of(*parts: Any) -> int:
    """A 60-bit seed derived from ``parts`` (ints and strings)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded with :func:`seed_of` ``(*parts)``: same parts, same draws."""
    g = torch.Generator()
    g.manual_seed(seed_of(*parts))
    return g
