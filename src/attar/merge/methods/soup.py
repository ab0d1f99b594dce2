"""Greedy model soup (Wortsman et al., 2022): add ingredients best-first, keep each only if held-out score does not drop.

The uniform soup is ``linear`` with equal weights; the greedy soup needs an
evaluator on a held-out split, so it is a model-level method that works on
in-memory state dicts. Scores should come from validation data, never test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from attar.merge.methods._state import check_same_keys, weighted_average
from attar.merge.methods.base import Evaluator, MergeMethod, StateDict, register


@dataclass
class ModelMergeResult:
    """A merged state dict plus what the search saw (for reports and the run store)."""

    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def greedy_soup(
    state_dicts: Sequence[StateDict],
    evaluate: Evaluator,
    *,
    scores: Sequence[float] | None = None,
) -> ModelMergeResult:
    """Greedy soup over ``state_dicts``.

    ``scores`` are the ingredients' own held-out scores if already known (saves
    one evaluation each). Ties in score keep the original order. A candidate is
    kept when the soup's score is >= the current best (the paper's rule).
    """
    check_same_keys(state_dicts, "ingredient")
    own = [float(s) for s in scores] if scores is not None else [float(evaluate(sd)) for sd in state_dicts]
    order = sorted(range(len(state_dicts)), key=lambda i: -own[i])
    soup = [order[0]]
    best = own[order[0]]
    history = [{"ingredient": order[0], "score": best, "kept": True}]
    for i in order[1:]:
        candidate = weighted_average([state_dicts[j] for j in soup + [i]])
        score = float(evaluate(candidate))
        kept = score >= best
        history.append({"ingredient": i, "score": score, "kept": kept})
        if kept:
            soup.append(i)
            best = score
    merged = weighted_average([state_dicts[j] for j in soup])
    return ModelMergeResult(
        merged,
        {"ingredients": soup, "ingredient_scores": own, "soup_score": best, "history": history},
    )


def _run(state_dicts: Sequence[StateDict], *, evaluate: Evaluator, scores: Sequence[float] | None = None, **_: Any) -> ModelMergeResult:
    return greedy_soup(state_dicts, evaluate, scores=scores)


register(
    MergeMethod(
        name="greedy_soup",
        summary="add fine-tunes best-first, keeping each only if the held-out score does not drop (needs data)",
        level="model",
        run=_run,
        base="none",
        min_models=1,
        reference="https://arxiv.org/abs/2203.05482",
    )
)
