"""Fisher-weighted averaging (Matena & Raffel, 2022): θ* = Σ w_i F_i θ_i / Σ w_i F_i per entry.

Each model's diagonal Fisher acts as the precision of a Laplace approximation of
its posterior, so an entry a model is "sure about" dominates the merge; with
equal Fishers this is the plain average. ``diagonal_fisher`` estimates F from
data (squared per-example gradients of log p(y|x)); wiring it to a data set is
the recipe stage's job.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.errors import AttarError
from attar.merge.methods._state import check_same_keys, logits_of
from attar.merge.methods.base import FisherEstimator, MergeMethod, StateDict, register
from attar.merge.methods.params import F32_MAX, Weight
from attar.merge.methods.soup import ModelMergeResult
from attar.registry import Params


def fisher_merge(
    state_dicts: Sequence[StateDict],
    fishers: Sequence[dict[str, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    fisher_floor: float = 1e-6,
) -> ModelMergeResult:
    """Merge with per-entry Fisher weights; tensors without a Fisher (buffers) get the weighted average.

    ``fisher_floor`` is added to every Fisher entry (as in the paper's code) so
    entries no model has information about fall back to the weighted average
    instead of dividing by zero.
    """
    names = check_same_keys(state_dicts)
    if len(fishers) != len(state_dicts):
        raise AttarError(f"got {len(fishers)} Fisher estimates for {len(state_dicts)} models; give one per model.")
    w = [1.0] * len(state_dicts) if weights is None else [float(v) for v in weights]
    out: dict[str, torch.Tensor] = {}
    plain: list[str] = []
    for k in names:
        ref = state_dicts[0][k]
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        have = [k in f for f in fishers]
        if any(have) and not all(have):
            raise AttarError(f"Fisher for tensor {k!r} is missing for some models but not others.")
        num = torch.zeros(ref.shape, dtype=torch.float32)
        den = torch.zeros(ref.shape, dtype=torch.float32)
        for wi, sd, f in zip(w, state_dicts, fishers):
            if all(have):
                fi = f[k].float()
                if fi.shape != ref.shape:
                    raise AttarError(f"Fisher for {k!r} has shape {tuple(fi.shape)}, the tensor {tuple(ref.shape)}.")
                fi = wi * (fi + fisher_floor)
            else:
                fi = torch.full(ref.shape, wi, dtype=torch.float32)
            num.add_(fi * sd[k].float())
            den.add_(fi)
        if not all(have):
            plain.append(k)
        out[k] = (num / den).to(ref.dtype)
    return ModelMergeResult(out, {"averaged_without_fisher": plain})


def diagonal_fisher(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    labels: Literal["sampled", "empirical", "expected"] = "expected",
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of log p(y|x) for every trainable parameter.

    ``batches`` yields inputs (or ``(x, y)`` pairs). ``labels``: ``expected``
    sums over classes weighted by p(y|x) (exact diagonal Fisher, one backward per
    class); ``sampled`` draws y ~ p(y|x); ``empirical`` uses the given labels.
    The model is put in eval mode (no dropout) and restored afterwards.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            if labels == "empirical" and y is None:
                raise AttarError("labels='empirical' needs (x, y) batches.")
            for i in range(len(x)):
                if max_examples is not None and seen >= max_examples:
                    break
                logp = F.log_softmax(logits_of(model(x[i : i + 1])).float(), dim=-1).reshape(-1)
                if labels == "expected":
                    probs = logp.exp().detach()
                    targets = [(int(c), float(probs[c])) for c in range(logp.numel())]
                elif labels == "sampled":
                    targets = [(int(torch.multinomial(logp.exp().detach(), 1, generator=g)), 1.0)]
                else:
                    targets = [(int(y[i]), 1.0)]
                for c, weight in targets:
                    grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True, allow_unused=True)
                    for (n, _), gr in zip(params.items(), grads):
                        if gr is not None:
                            fisher[n].add_(gr.float().pow(2), alpha=weight)
                seen += 1
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise AttarError("diagonal_fisher got no examples.")
    return {n: f / seen for n, f in fisher.items()}


def _run(
    state_dicts: Sequence[StateDict],
    *,
    fishers: Sequence[dict[str, torch.Tensor]] | None = None,
    fisher: FisherEstimator | None = None,
    models: Sequence[torch.nn.Module] | None = None,
    weights: Sequence[float] | None = None,
    fisher_floor: float = 1e-6,
    **_: Any,
) -> ModelMergeResult:
    """Precomputed ``fishers``, or a ``fisher`` estimator applied to ``models`` (one per state dict)."""
    if fishers is None:
        if fisher is None or models is None or len(models) != len(state_dicts):
            raise AttarError("fisher merging needs Fisher estimates: pass fishers=[...], or fisher=estimator and models=[...].")
        fishers = [fisher(m) for m in models]
    return fisher_merge(state_dicts, fishers, weights=weights, fisher_floor=fisher_floor)


class FisherParams(Params):
    """``examples``, ``labels`` and ``batch_size`` are read by a recipe's merge stage, which estimates the Fishers."""

    weight: Weight = 1.0
    fisher_floor: float = Field(1e-6, ge=0.0, le=F32_MAX, description="the smallest Fisher value used")
    examples: int = Field(256, ge=1, le=10**9, description="rows used for the Fisher estimate (a whole number)")
    labels: Literal["expected", "sampled", "empirical"] = Field("expected", description="which labels the Fisher uses")
    batch_size: int = Field(16, ge=1, le=10**9, description="rows per Fisher batch (a whole number)")


register(
    MergeMethod(
        name="fisher",
        summary="Fisher-weighted average: sum F_i theta_i / sum F_i per entry (needs data)",
        level="model",
        run=_run,
        base="none",
        min_models=1,
        Params=FisherParams,
        reference="https://arxiv.org/abs/2111.09832",
    )
)
