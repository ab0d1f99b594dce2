"""Seeded, stratified index selection: the only place splits are decided.

Every choice draws from its own ``numpy`` generator seeded by ``(seed, purpose)``, so
changing e.g. ``train_limit`` never changes which rows went to validation, and the
same spec always gives the same rows.
"""

from __future__ import annotations

import numpy as np

from attar.errors import AttarError

# Carved test splits use a constant seed, not ``spec.seed``: a teacher trained with
# seed 0 and a student trained with seed 1 must be scored on the same held-out rows,
# and neither may have trained on the other's test rows.
TEST_SEED = 0

# Purpose tags mixed into the seed so each kind of choice has an independent stream.
TEST, VAL, LIMIT, LABELED = 1, 2, 3, 4


def rng_for(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(purpose)])


def stratified_pick(y: np.ndarray, n_pick: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pick exactly ``n_pick`` row indices with class proportions kept; returns (picked, rest), each sorted.

    Per-class quotas use largest remainders so the total is exact; label ``-1`` is
    treated as one more stratum.
    """
    y = np.asarray(y)
    n = len(y)
    n_pick = int(min(max(n_pick, 0), n))
    if n_pick == 0 or n == 0:
        return np.zeros(0, dtype=np.int64), np.arange(n, dtype=np.int64)
    if n_pick == n:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    values, counts = np.unique(y, return_counts=True)
    exact = counts * (n_pick / n)
    quota = np.floor(exact).astype(np.int64)
    short = n_pick - int(quota.sum())
    if short > 0:
        # Largest fractional part first; ties broken by class order (stable sort) for determinism.
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:short]] += 1
    picked = []
    for v, q in zip(values, quota):
        idx = np.flatnonzero(y == v)
        picked.append(rng.permutation(idx)[:q])
    pick = np.sort(np.concatenate(picked)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[pick] = False
    return pick, np.flatnonzero(mask).astype(np.int64)


def fraction_count(n: int, fraction: float) -> int:
    return int(round(n * fraction))


def labeled_subset(y: np.ndarray, per_class: int, rng: np.random.Generator, classes: list[str]) -> np.ndarray:
    """Return a copy of ``y`` where only ``per_class`` seeded rows per class keep their label (rest -1)."""
    y = np.asarray(y)
    out = np.full_like(y, -1)
    counts = [int((y == c).sum()) for c in range(len(classes))]
    short = [f"{classes[c]!r} has only {n}" for c, n in enumerate(counts) if n < per_class]
    if short:
        raise AttarError(
            f"labeled_per_class={per_class} but class {', '.join(short)} training rows; lower labeled_per_class "
            f"to at most {min(counts)} (or raise train_limit / lower val_fraction)"
        )
    for c in range(len(classes)):
        keep = rng.permutation(np.flatnonzero(y == c))[:per_class]
        out[keep] = c
    return out
