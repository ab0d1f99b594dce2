"""Logit distillation: ``kd`` (Hinton et al.), ``label_free`` and ``ensemble`` (MEAL V2), with any divergence.

Conventions shared by every distillation objective (they all build on :class:`KD`):

* ``batch.teacher_logits`` is ``[B, C]`` (one teacher) or ``[T, B, C]`` (an ensemble). An
  ensemble's target is the average of the teachers' *probabilities* at temperature ``τ``
  (MEAL V2), passed on as the logits ``τ·log p̄_τ`` — exact, since
  ``softmax(τ·log p̄_τ / τ) = p̄_τ`` (see :func:`teacher_target`).
* The weight ``alpha`` always multiplies the label term: ``loss = α·CE + (1−α)·D``. Cross-entropy
  terms average over the labeled rows; teacher terms use every row.
* The divergence ``D`` is named by the field ``divergence``; its own parameters go under
  ``divergence_args`` or, when they do not clash with the objective's fields, at the top level
  (``{name: kd, divergence: gjsd, beta: 0.3}``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from attar.distill.divergences import DIVERGENCES, check_divergence_args, divergence
from attar.errors import AttarError
from attar.registry import Params
from attar.train.objective import Batch, Objective, masked_ce, register

__all__ = ["DivergenceParams", "KDParams", "KD", "LabelFree", "Ensemble", "teacher_target"]

ALPHA_DOC = "weight of the cross-entropy on labeled rows; the teacher term gets 1 - alpha"
T_DOC = "softmax temperature of the teacher term"
_DIV_DOC = "any registered divergence (kl, reverse_kl, js, gjsd, skew_kl, tvd, sinkhorn, ...)"
_ARGS_DOC = "the divergence's own parameters (also accepted at the top level when no field has their name)"


class _DivergenceChecks(Params):
    """Checks shared by every Params with ``divergence``/``divergence_args`` fields (declared by the subclass,
    so each lists its fields in its own order)."""

    @model_validator(mode="before")
    @classmethod
    def _flat_divergence_args(cls, data: Any) -> Any:
        """``{divergence: gjsd, beta: 0.3}`` -> ``divergence_args: {beta: 0.3}`` (a flat key wins over a nested one)."""
        if not isinstance(data, dict):
            return data
        div = data.get("divergence", cls.model_fields["divergence"].default)
        if not isinstance(div, str) or div not in DIVERGENCES:
            return data  # the field's own check names the problem
        accepted = DIVERGENCES.fields(div)
        flat = {k: v for k, v in data.items() if k not in cls.model_fields and k in accepted}
        if not flat:
            return data
        rest = {k: v for k, v in data.items() if k not in flat}
        return {**rest, "divergence_args": {**dict(data.get("divergence_args") or {}), **flat}}

    @field_validator("divergence", check_fields=False)
    @classmethod
    def _known_divergence(cls, v: str) -> str:
        if v not in DIVERGENCES:
            raise ValueError(f"not a known divergence; expected one of {', '.join(DIVERGENCES.names())}")
        return v

    @field_validator("divergence_args", check_fields=False)
    @classmethod
    def _divergence_takes_them(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        div = info.data.get("divergence")
        if div is not None:  # None: the divergence itself was refused
            try:
                check_divergence_args(div, v)
            except AttarError as e:
                raise ValueError(str(e).rstrip(".")) from None
        return v


class DivergenceParams(_DivergenceChecks):
    """The teacher term alone: temperature, divergence and the divergence's own parameters."""

    temperature: float = Field(4.0, gt=0, description=T_DOC)
    divergence: str = Field("kl", description=_DIV_DOC)
    divergence_args: dict[str, Any] = Field(default_factory=dict, description=_ARGS_DOC)


class KDParams(_DivergenceChecks):
    alpha: float = Field(0.5, ge=0, le=1, description=ALPHA_DOC)
    temperature: float = Field(4.0, gt=0, description=T_DOC)
    divergence: str = Field("kl", description=_DIV_DOC)
    divergence_args: dict[str, Any] = Field(default_factory=dict, description=_ARGS_DOC)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the CE term")


def teacher_target(teacher_logits: torch.Tensor | None, student_logits: torch.Tensor, temperature: float,
                   who: str) -> torch.Tensor:
    """The teacher's ``[B, C]`` logits for the divergence; an ensemble ``[T, B, C]`` becomes
    ``τ·log( (1/T) Σ_t softmax(z_t/τ) )`` so that ``softmax(·/τ)`` is exactly the averaged
    probabilities (MEAL V2's target). Always detached, float32, on the student's device."""
    if teacher_logits is None:
        raise AttarError(
            f"objective {who!r} needs teacher logits but the batch has none: give the stage a 'teacher'."
        )
    t = teacher_logits.detach().to(device=student_logits.device, dtype=torch.float32)
    if t.dim() == 3:
        if t.shape[0] == 1:
            t = t[0]
        else:
            logp = torch.log_softmax(t / temperature, dim=-1)
            t = temperature * (torch.logsumexp(logp, dim=0) - math.log(t.shape[0]))
    if t.dim() != 2 or t.shape != student_logits.shape:
        raise AttarError(
            f"objective {who!r}: teacher logits of shape {tuple(teacher_logits.shape)} do not match the "
            f"student's {tuple(student_logits.shape)} (expected [B, C] or [teachers, B, C]); do the "
            "teacher and student predict the same classes, and is the cache built on this training set?"
        )
    return t


@register("kd")
class KD(Objective):
    """Logit KD (Hinton et al. 2015): ``α·CE(z_s, y) + (1−α)·D(p_T ‖ q_T)``.

    ``D`` is any registered divergence on the temperature-softened distributions (the KL family
    already carries the ``T²`` factor). The divergence covers every row, labeled or not, so
    ``alpha=0`` is label-free KD on an unlabeled pool (SSLD, PD, SimCLRv2 step 3); an ensemble
    of teachers is distilled through its averaged probabilities (:func:`teacher_target`).
    """

    needs_teacher = True
    Params = KDParams

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._kd_losses(batch, logits, logits)

    def _kd_losses(self, batch: Batch, ce_logits: torch.Tensor, kd_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``α·CE(ce_logits, y) + (1−α)·D(teacher ‖ kd_logits)``: the one KD term every subclass adds to."""
        a = getattr(self.p, "alpha", 0.0)
        target = teacher_target(batch.teacher_logits, kd_logits, self.p.temperature, self.name)
        kd = divergence(self.p.divergence, kd_logits, target, self.p.temperature, **self.p.divergence_args)
        out: dict[str, torch.Tensor] = {}
        if a > 0:
            ce = masked_ce(ce_logits, batch.y, getattr(self.p, "label_smoothing", 0.0))
            loss = a * ce + (1 - a) * kd
            out["ce"] = ce.detach()
        else:
            loss = kd
        out["kd"] = kd.detach()
        out["loss"] = loss
        return out


@register("label_free")
class LabelFree(KD):
    """Label-free KD: ``D(p_T ‖ q_T)`` only; labels are ignored entirely (``kd`` with ``alpha=0``)."""

    Params = DivergenceParams


@register("ensemble")
class Ensemble(KD):
    """MEAL V2-style ensemble KD: target ``p̄ = (1/T) Σ_t softmax(z_t/τ)``, loss
    ``KL(p̄ ‖ softmax(z_s/τ))·τ²`` (+ ``α·CE``; default ``α=0``: no hard labels, as MEAL V2).

    Accepts ``[T, B, C]`` live teacher logits or ``[B, C]`` (one teacher, or a cache that already
    holds ``τ·log p̄``). MEAL V2's discriminator term is not included."""

    class Params(KDParams):
        alpha: float = Field(0.0, ge=0, le=1, description=ALPHA_DOC + " (MEAL V2 uses none: 0)")
        temperature: float = Field(1.0, gt=0, description=T_DOC + " (MEAL V2: 1)")
