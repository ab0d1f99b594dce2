"""WiSE-FT: interpolate zero-shot and fine-tuned weights, θ_α = (1 − α)θ_0 + αθ_1, choosing α on held-out data.

(Wortsman et al., 2022.) A fixed α is just ``linear`` (or ``slerp``); the
model-level method sweeps α and reports the whole curve, since the best α for
in-distribution accuracy is usually not the best under distribution shift.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from pydantic import Field

from attar.errors import AttarError
from attar.merge.methods._state import weighted_average
from attar.merge.methods.base import Evaluator, MergeMethod, StateDict, register
from attar.merge.methods.params import Unit
from attar.merge.methods.soup import ModelMergeResult
from attar.registry import Params

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))


def interpolate(zero_shot: StateDict, fine_tuned: StateDict, alpha: float):
    return weighted_average([zero_shot, fine_tuned], [1 - alpha, alpha], normalize=False)


def wise_ft(
    zero_shot: StateDict,
    fine_tuned: StateDict,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    evaluate: Evaluator | None = None,
    alpha: float | None = None,
) -> ModelMergeResult:
    """With ``evaluate``: sweep ``alphas`` and return the best (ties -> smaller α); else interpolate at ``alpha``."""
    if evaluate is None:
        if alpha is None:
            raise AttarError("wise_ft needs either an evaluator (to sweep alphas) or a fixed alpha.")
        return ModelMergeResult(interpolate(zero_shot, fine_tuned, alpha), {"alpha": alpha})
    curve = []
    best_alpha, best_score = None, float("-inf")
    for a in alphas:
        score = float(evaluate(interpolate(zero_shot, fine_tuned, a)))
        curve.append({"alpha": a, "score": score})
        if score > best_score:
            best_alpha, best_score = a, score
    return ModelMergeResult(
        interpolate(zero_shot, fine_tuned, best_alpha), {"alpha": best_alpha, "score": best_score, "curve": curve}
    )


def _run(state_dicts: Sequence[StateDict], *, base: StateDict | None = None, evaluate: Evaluator | None = None, **opts: Any) -> ModelMergeResult:
    if base is None or len(state_dicts) != 1:
        raise AttarError("wise_ft takes the zero-shot model as base and exactly one fine-tuned model.")
    return wise_ft(base, state_dicts[0], evaluate=evaluate, **opts)


class WiseFtParams(Params):
    alpha: Optional[Unit] = Field(None, description="the WiSE-FT mixing coefficient, fixed (no sweep)")
    alphas: list[Unit] = Field(list(DEFAULT_ALPHAS), description="the WiSE-FT mixing coefficients swept")


register(
    MergeMethod(
        name="wise_ft",
        summary="interpolate zero-shot (base) and fine-tuned weights, sweeping alpha on held-out data",
        level="model",
        run=_run,
        base="required",
        min_models=1,
        max_models=1,
        Params=WiseFtParams,
        reference="https://arxiv.org/abs/2109.01903",
    )
)
