"""Divergences between a teacher's and a student's class distributions, on logits.

Every divergence is a function registered in :data:`DIVERGENCES` with the signature::

    fn(student_logits [B, C], teacher_logits [B, C], temperature=1.0, reduction="mean", **params)

and compares the *softened* distributions ``p = softmax(teacher / T)`` (the target) and
``q = softmax(student / T)`` (the prediction). ``reduction="mean"`` returns a scalar averaged over
the batch, ``"none"`` a per-sample tensor ``[B]``; batch-wise divergences (``sinkhorn_batch``) have
no per-sample value and reject ``"none"``.

Conventions shared by all of them:

* **Teacher given as logits.** Any shift of a row leaves softmax unchanged, so log-probabilities
  (e.g. the log of an ensemble's averaged probabilities) are valid teacher "logits" too.
* **Gradients reach the student only**: the teacher is detached.
* **Stable arithmetic**: everything works from ``log_softmax`` in at least float32 (half-precision
  inputs are upcast), mixtures are formed with ``logsumexp``, Sinkhorn runs in the log domain.
  A class masked with ``-inf`` in both models contributes exactly nothing (same value as dropping
  the class). Log-probabilities are floored at ``-1e30`` so a masked class never yields
  ``0 * log 0 = NaN``; a divergence that is truly infinite (student mass on a class the teacher
  masked, under reverse KL) comes out as a huge finite number instead of ``inf``/NaN.
* **Temperature scaling**: the KL family (``kl``, ``reverse_kl``, ``js``, ``gjsd``, ``skew_kl``,
  ``skew_reverse_kl``) is multiplied by ``T**2`` (Hinton et al. 2015). These are locally quadratic
  in ``p - q``, and ``p - q`` and its logit-gradient each shrink like ``1/T``, so their gradients
  shrink like ``1/T**2``; ``T**2`` keeps the KD term's weight comparable across temperatures.
  ``tvd``, ``sinkhorn`` and ``sinkhorn_batch`` are *not* scaled: they are linear in ``|p - q|``
  (their gradients shrink only like ``1/T``), so ``T**2`` would over-weight them at high ``T``;
  SinKD's reference code also applies no ``T**2``. Fold any wanted scale into the loss weight.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, get_type_hints

import torch
from pydantic import ConfigDict, ValidationError, create_model
from torch import Tensor

from attar.errors import AttarError
from attar.registry import Params, Registry, fields_text, validation_error

__all__ = ["DIVERGENCES", "divergence", "divergence_params", "check_divergence_args", "is_batchwise"]

DIVERGENCES: Registry[Callable[..., Tensor]] = Registry("divergence")

#: Floor for log-probabilities: turns ``-inf`` (masked classes) into a finite number so that
#: ``0 * (log 0 - log q)`` is ``0`` and not NaN, in values and gradients alike.
_LOG_FLOOR = -1e30
_REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------------------------
# Registration: one wrapper does the checks, the softening and the reduction for every divergence.
# ----------------------------------------------------------------------------------------------


def _register(name: str, *, batchwise: bool = False, t2: bool = True):
    """Register ``core(log_q, log_p, **params)`` as divergence ``name``.

    ``core`` gets the softened, floored log-probabilities of the student (``log_q``) and the
    detached teacher (``log_p``), both ``[B, C]``, and returns per-sample values ``[B]`` (or a
    scalar when ``batchwise``). Its keyword-only parameters, with defaults, are the divergence's
    extra params: reported by :func:`divergence_params` and, as a ``Params`` model built from the
    signature, by ``DIVERGENCES.fields(name)`` like any other method family.
    """

    def deco(core: Callable[..., Tensor]) -> Callable[..., Tensor]:
        sig = inspect.signature(core)
        defaults = {
            k: p.default for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        hints = get_type_hints(core)
        params_model = create_model(f"{name}_params", __base__=_DivergenceParams,
                                    **{k: (hints.get(k, Any), v) for k, v in defaults.items()})

        @functools.wraps(core)
        def fn(
            student_logits: Tensor,
            teacher_logits: Tensor,
            temperature: float = 1.0,
            reduction: str = "mean",
            **params: Any,
        ) -> Tensor:
            check_divergence_args(name, params)
            if reduction not in _REDUCTIONS:
                raise AttarError(
                    f"divergence {name!r}: reduction={reduction!r} is not supported; use 'mean' or 'none'."
                )
            if batchwise and reduction == "none":
                raise AttarError(
                    f"divergence {name!r} compares the whole batch at once and has no per-sample value; "
                    "use reduction='mean'."
                )
            log_q, log_p = _soften(name, student_logits, teacher_logits, temperature)
            out = core(log_q, log_p, **{**defaults, **params})
            if t2:
                out = out * (float(temperature) ** 2)
            if batchwise or reduction == "none":
                return out
            return out.mean()

        fn.params = dict(defaults)  # type: ignore[attr-defined]
        fn.Params = params_model  # type: ignore[attr-defined]
        fn.batchwise = batchwise  # type: ignore[attr-defined]
        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter("student_logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                inspect.Parameter("teacher_logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                inspect.Parameter("temperature", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=1.0),
                inspect.Parameter("reduction", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="mean"),
                *[p for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY],
            ],
            return_annotation=Tensor,
        )
        DIVERGENCES.register(name)(fn)
        return fn

    return deco


class _DivergenceParams(Params):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True)  # cost: a tensor


def check_divergence_args(name: str, args: dict[str, Any]) -> None:
    """Refuse parameters divergence ``name`` does not take (naming them and the ones it does) or of the wrong
    type: one wording for a call and for an objective's or selector's ``divergence_args``. Ranges (``beta`` in
    [0, 1], a cost matrix's shape) are the divergence's own checks, made when it runs."""
    model = DIVERGENCES.get(name).Params  # type: ignore[attr-defined]
    unknown = sorted(set(args) - set(model.model_fields))
    if unknown:
        accepted = fields_text(model) if model.model_fields else "none"
        raise AttarError(f"divergence {name!r} does not accept {', '.join(map(repr, unknown))}. "
                         f"Accepted parameters: {accepted}")
    try:
        model.model_validate(args)
    except ValidationError as e:
        raise validation_error(f"divergence {name!r}", e) from None


def _soften(name: str, s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Check shapes, detach the teacher, upcast, and return floored ``log_softmax(x / T)``."""
    for label, x in (("student_logits", s), ("teacher_logits", t)):
        if not isinstance(x, Tensor):
            raise AttarError(f"divergence {name!r}: {label} must be a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 2:
            raise AttarError(
                f"divergence {name!r}: {label} must have shape [batch, classes], got {tuple(x.shape)}. "
                "Average an ensemble's teacher probabilities (or pass their log) before calling."
            )
    if s.shape != t.shape:
        raise AttarError(
            f"divergence {name!r}: student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} "
            "must have the same shape; do the student and teacher predict the same classes?"
        )
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise AttarError(f"divergence {name!r}: empty logits of shape {tuple(s.shape)}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise AttarError(f"divergence {name!r}: temperature must be a positive number, got {temperature!r}.")
    dtype = torch.promote_types(s.dtype, torch.float32) if s.is_floating_point() else torch.float32
    t = t.detach()
    # Each skipped op is a full pass over [B, C] forward and backward (a 150k vocabulary makes that the step's cost):
    # no division at T = 1, the teacher floored in place (no graph), and the student floored only when its logits
    # hold a -inf (finite logits give finite log-probabilities).
    log_q = torch.log_softmax(s.to(dtype) if temperature == 1 else s.to(dtype) / temperature, dim=-1)
    log_p = torch.log_softmax(t.to(dtype) if temperature == 1 else t.to(dtype) / temperature, dim=-1)
    if not bool(torch.isfinite(s).all()):
        log_q = log_q.clamp_min(_LOG_FLOOR)
    return log_q, log_p.clamp_min_(_LOG_FLOOR)


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a‖b) per row, ``Σ_c a_c (log a_c − log b_c)``, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w·a + (1−w)·b)`` for ``0 < w < 1``, computed with logsumexp."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _unit_interval(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise AttarError(f"divergence {name!r}: {key} must be a number in [0, 1], got {value!r}.")
    return float(value)


def _positive(name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise AttarError(f"divergence {name!r}: {key} must be a positive number, got {value!r}.")
    return float(value)


def _count(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttarError(f"divergence {name!r}: {key} must be an integer >= 1, got {value!r}.")
    return value


# ----------------------------------------------------------------------------------------------
# The KL family (scaled by T²)
# ----------------------------------------------------------------------------------------------


@_register("kl")
def _kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Forward KL, ``KL(p‖q)·T² = T² Σ p log(p/q)`` — classic KD (Hinton et al.).

    Mass-covering: the student is punished wherever the teacher has mass it lacks, so it spreads
    over all of the teacher's modes (SinKD's "mode averaging")."""
    return _kl_rows(log_p, log_q)


@_register("reverse_kl")
def _reverse_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Reverse KL, ``KL(q‖p)·T² = T² Σ q log(q/p)``.

    Mode-seeking: the student is punished for mass where the teacher has little, so it may
    collapse onto one teacher mode. Infinite (floored, see module doc) if the student puts mass
    on a class the teacher masks with ``-inf``."""
    return _kl_rows(log_q, log_p)


@_register("js")
def _js(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Jensen–Shannon, ``T²·[½ KL(p‖m) + ½ KL(q‖m)]`` with ``m = (p + q)/2``.

    Symmetric and bounded by ``ln 2`` (before the ``T²``), finite even without overlap —
    but its gradient vanishes when p and q barely overlap ("mode underestimation")."""
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * _kl_rows(log_p, log_m) + 0.5 * _kl_rows(log_q, log_m)


@_register("gjsd")
def _gjsd(log_q: Tensor, log_p: Tensor, *, beta: float = 0.5) -> Tensor:
    """Generalised JSD of GKD (Agarwal et al. 2024), ``T²·JSD_β``, interpolating KL and reverse KL.

    For ``0 < β < 1``: ``m = β p + (1−β) q`` and ``JSD_β = β KL(p‖m) + (1−β) KL(q‖m)`` (GKD's
    definition, p = teacher). ``β = 0.5`` is exactly ``js``.

    Endpoints: the formula itself tends to 0 at both ends (``m`` becomes q resp. p and the surviving
    term's weight goes to 0); GKD's limits hold for the *rescaled* form, ``JSD_β/β → KL(p‖q)`` as
    ``β→0`` and ``JSD_β/(1−β) → KL(q‖p)`` as ``β→1``. So, like TRL's ``GKDTrainer``, the endpoints
    are defined as those limits: ``β = 0`` is forward KL and ``β = 1`` is reverse KL exactly. Note
    the jump in scale there: ``gjsd(β=1e-6) ≈ 1e-6·kl``, not ``kl``; pick the KD weight with β."""
    beta = _unit_interval("gjsd", "beta", beta)
    if beta == 0.0:
        return _kl_rows(log_p, log_q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


@_register("skew_kl")
def _skew_kl(log_q: Tensor, log_p: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024), ``T²·KL(p ‖ α p + (1−α) q)``.

    Mixing a little teacher into the student's side keeps the ratio bounded (``≤ −log α``) when
    the student gives a teacher class ~0 mass, which stabilises gradients. ``α = 0`` is forward
    KL, ``α = 1`` is 0."""
    alpha = _unit_interval("skew_kl", "alpha", alpha)
    if alpha == 0.0:
        return _kl_rows(log_p, log_q)
    if alpha == 1.0:
        return (0.0 * log_q).sum(-1)  # KL(p‖p); kept on the graph so .backward() still works
    return _kl_rows(log_p, _log_mix(log_p, log_q, alpha))


@_register("skew_reverse_kl")
def _skew_reverse_kl(log_q: Tensor, log_p: Tensor, *, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL of DistiLLM, ``T²·KL(q ‖ α q + (1−α) p)``; ``α = 0`` is reverse KL.

    Bounded (``≤ −log α``) even where the teacher masks a class the student still uses."""
    alpha = _unit_interval("skew_reverse_kl", "alpha", alpha)
    if alpha == 0.0:
        return _kl_rows(log_q, log_p)
    if alpha == 1.0:
        return (0.0 * log_q).sum(-1)
    return _kl_rows(log_q, _log_mix(log_q, log_p, alpha))


# ----------------------------------------------------------------------------------------------
# Distances linear in |p − q| (no T²)
# ----------------------------------------------------------------------------------------------


@_register("tvd", t2=False)
def _tvd(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Total variation, ``½ Σ |p − q|`` in [0, 1] (TVD++ drafter KD), not scaled by T².

    A true metric that stays informative without overlap; its logit-gradient shrinks only like
    ``1/T``, hence no ``T²`` (module doc)."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _cost_matrix(name: str, cost: Any, num_classes: int, like: Tensor) -> Tensor:
    if isinstance(cost, str):
        idx = torch.arange(num_classes, device=like.device, dtype=like.dtype)
        if cost == "zero_one":
            return 1.0 - torch.eye(num_classes, device=like.device, dtype=like.dtype)
        if cost == "abs":
            return (idx[:, None] - idx[None, :]).abs()
        raise AttarError(
            f"divergence {name!r}: cost={cost!r} is not known; use 'zero_one', 'abs' "
            f"or a [{num_classes}, {num_classes}] tensor."
        )
    if not isinstance(cost, Tensor):
        raise AttarError(
            f"divergence {name!r}: cost must be 'zero_one', 'abs' or a [C, C] tensor, got {type(cost).__name__}."
        )
    if cost.shape != (num_classes, num_classes):
        raise AttarError(
            f"divergence {name!r}: cost has shape {tuple(cost.shape)} but the logits have "
            f"{num_classes} classes; it must be [{num_classes}, {num_classes}]."
        )
    cost = cost.detach().to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(cost).all()) or bool((cost < 0).any()):
        raise AttarError(f"divergence {name!r}: cost must be finite and non-negative.")
    return cost


def _sinkhorn_plan(log_a: Tensor, log_b: Tensor, cost: Tensor, epsilon: float, n_iters: int) -> Tensor:
    """Log of the entropic OT plan between marginals ``a`` [..., n] and ``b`` [..., m].

    Log-domain Sinkhorn (Cuturi 2013; Peyré & Cuturi 2019, §4.4): with ``log K = −M/ε``, alternate
    ``log u = log a − LSE_j(log K_ij + log v_j)`` and ``log v = log b − LSE_i(log K_ij + log u_i)``;
    the plan is ``P = diag(u) K diag(v)``. Ends on a ``v`` update, so P's column sums equal b
    exactly and its row sums approach a. Batched over leading dims; differentiated by unrolling."""
    log_k = -cost / epsilon  # [..., n, m] (broadcasts)
    log_v = torch.zeros_like(log_b)
    log_u = torch.zeros_like(log_a)
    for _ in range(n_iters):
        log_u = log_a - torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
        log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)
    return log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2)


@_register("sinkhorn", t2=False)
def _sinkhorn(
    log_q: Tensor,
    log_p: Tensor,
    *,
    epsilon: float = 0.1,
    n_iters: int = 20,
    cost: str | Tensor = "zero_one",
) -> Tensor:
    """Per-sample Sinkhorn distance (SinKD, Cui et al. 2024), ``⟨P_ε, M⟩`` between p and q over classes.

    ``P_ε`` is the entropic OT plan with marginals p (teacher, rows) and q (student, columns) and
    cost ``M`` [C, C]: ``'zero_one'`` (``M_ij = [i ≠ j]``, default; exact OT is then the TVD),
    ``'abs'`` (``|i − j|``, ordinal classes; exact OT is ``Σ_k |CDF_p − CDF_q|``) or any
    non-negative tensor. Unlike KL it stays informative when p and q do not overlap.

    Returned is the transport cost ``⟨P_ε, M⟩`` (Cuturi's "Sinkhorn distance"), not the regularised
    objective. Entropic bias: ``P_ε`` keeps off-diagonal mass of order ``e^{−min cost/ε}``, so
    identical inputs give a small positive value (≈ (C−1)·e^{−1/ε} for the 0/1 cost: 4e-4 for
    10 classes at ε = 0.1) and
    the value approaches exact OT from above as ``ε → 0`` (with more ``n_iters``). Cost
    ``O(B·C²·n_iters)`` time and memory — meant for class counts, not LLM vocabularies."""
    epsilon = _positive("sinkhorn", "epsilon", epsilon)
    n_iters = _count("sinkhorn", "n_iters", n_iters)
    m = _cost_matrix("sinkhorn", cost, log_p.shape[-1], log_p)
    log_plan = _sinkhorn_plan(log_p, log_q, m, epsilon, n_iters)  # [B, C, C]
    return (log_plan.exp() * m).sum(dim=(-2, -1))


@_register("sinkhorn_batch", batchwise=True, t2=False)
def _sinkhorn_batch(log_q: Tensor, log_p: Tensor, *, epsilon: float = 0.1, n_iters: int = 20) -> Tensor:
    """Batch-wise Sinkhorn distance (SinKD's batch reformulation); a scalar, no per-sample value.

    The B teacher distributions ``p_i`` and the B student distributions ``q_j`` are two point
    clouds with uniform weights ``1/B``; the ground cost is ``M_ij = ‖p_i − q_j‖₁`` (∈ [0, 2]) —
    the L1 cost of SinKD's reference code (``torch.cdist(p_s, p_t, p=1)``). Returned is
    ``⟨P_ε, M⟩`` for the entropic plan (log-domain Sinkhorn), so the geometry across samples, not
    only each pair, shapes the loss. SinKD's code normalises the plan to total mass B (a sum over
    samples); here the mass is 1 (a mean), i.e. SinKD's value divided by B.

    It is invariant to permuting the student rows: it matches the batch *as a set* and ignores
    which student row belongs to which teacher row, so pair it with a per-sample term. Identical
    batches give ≈0 (entropic bias ``~e^{−d/ε}`` with d the smallest distance between distinct
    samples' distributions)."""
    epsilon = _positive("sinkhorn_batch", "epsilon", epsilon)
    n_iters = _count("sinkhorn_batch", "n_iters", n_iters)
    p, q = log_p.exp(), log_q.exp()
    m = torch.cdist(p.unsqueeze(0), q.unsqueeze(0), p=1).squeeze(0)  # [B(teacher), B(student)]
    b = p.shape[0]
    log_w = torch.full((b,), -math.log(b), dtype=p.dtype, device=p.device)
    log_plan = _sinkhorn_plan(log_w, log_w, m, epsilon, n_iters)
    return (log_plan.exp() * m).sum()


# ----------------------------------------------------------------------------------------------
# Convenience
# ----------------------------------------------------------------------------------------------


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
    **params: Any,
) -> Tensor:
    """``DIVERGENCES.get(name)(student_logits, teacher_logits, temperature, reduction, **params)``."""
    return DIVERGENCES.get(name)(student_logits, teacher_logits, temperature, reduction, **params)


def divergence_params(name: str) -> dict[str, Any]:
    """Extra parameters divergence ``name`` accepts, with their defaults (e.g. ``{'beta': 0.5}``).

    Lets recipes validate their fields before training; unknown names raise ``AttarError``."""
    return dict(DIVERGENCES.get(name).params)  # type: ignore[attr-defined]


def is_batchwise(name: str) -> bool:
    """True when divergence ``name`` compares the whole batch and has no per-sample value."""
    return bool(DIVERGENCES.get(name).batchwise)  # type: ignore[attr-defined]
