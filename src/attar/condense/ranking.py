"""DD-Ranking's scores (Li et al., 2025, "DD-Ranking: Rethinking the Evaluation of Dataset Distillation"):
how much of a condensed set's accuracy is due to its images rather than to its labels or augmentation.

Why: once soft labels (a teacher's knowledge) and augmentation are held equal, a random real subset often
matches a published method; the plain test accuracy hides that. Accuracies are fractions in [0, 1].

* Label-robust score. ``HLR = acc(real, hard) − acc(syn, hard)`` (hard-label recovery: lower is better) and
  ``IOR = acc(syn, any) − acc(random, any)`` (improvement over a random real subset of the same size trained
  the *same* way: the method's own labels, soft or hard, and augmentation); ``α = w·IOR − (1 − w)·HLR``.
* Augmentation-robust score. ``β = γ·(acc(syn, aug) − acc(random, aug)) + (1 − γ)·(acc(syn, no aug) −
  acc(random, no aug))``.

Both are mapped from ``[−1, 1]`` to ``[0, 100]`` by ``100·(e^x − e^−1)/(e − e^−1)``: 50 is not the midpoint
(``x = 0``, no gain over random and full recovery, gives 26.9); higher is better.
"""

from __future__ import annotations

import math
from typing import Any

from attar.errors import AttarError


def normalise(x: float) -> float:
    """DD-Ranking's map of a score in [−1, 1] to a percentage in [0, 100]."""
    return 100.0 * (math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def _check(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise AttarError(f"{name} must be an accuracy in [0, 1] (a fraction, not a percentage), got {v}.")
    return v


def _weight(name: str, w: float) -> float:
    if not 0.0 <= float(w) <= 1.0:
        raise AttarError(f"{name} must be in [0, 1], got {w}.")
    return float(w)


def label_robust_score(real_hard: float, syn_hard: float, syn_any: float, random_any: float,
                       w: float = 0.5) -> dict[str, Any]:
    """LRS from four accuracies: full data (hard labels), the condensed set (hard labels), the condensed set
    and a random real subset both trained with the method's own evaluation (labels and augmentation)."""
    rh, sh = _check("real_hard", real_hard), _check("syn_hard", syn_hard)
    sa, ra = _check("syn_any", syn_any), _check("random_any", random_any)
    w = _weight("w", w)
    hlr, ior = rh - sh, sa - ra
    alpha = w * ior - (1 - w) * hlr
    return {"hlr": hlr, "ior": ior, "alpha": alpha, "lrs": normalise(alpha), "w": w}


def augmentation_robust_score(syn_aug: float, random_aug: float, syn_no_aug: float, random_no_aug: float,
                              gamma: float = 0.5) -> dict[str, Any]:
    """ARS from the condensed set and an equal-size random real subset, each trained with and without the
    augmentation (the same labels throughout)."""
    sa, ra = _check("syn_aug", syn_aug), _check("random_aug", random_aug)
    sn, rn = _check("syn_no_aug", syn_no_aug), _check("random_no_aug", random_no_aug)
    g = _weight("gamma", gamma)
    gain_aug, gain_no_aug = sa - ra, sn - rn
    beta = g * gain_aug + (1 - g) * gain_no_aug
    return {"gain_aug": gain_aug, "gain_no_aug": gain_no_aug, "beta": beta, "ars": normalise(beta), "gamma": g}
