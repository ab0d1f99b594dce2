"""The narrow interface between the trainer and every training method, and plain cross-entropy.

The trainer builds a :class:`Batch`, runs the student, and hands both to an :class:`Objective`,
which returns named losses. Cross-entropy, KD with any divergence, feature KD, self-distillation
and dual-head training are all objectives; the trainer never knows which one it runs.

Adding an objective is one file: a subclass with a strict ``Params`` model, registered with
``@register("name")`` into :data:`OBJECTIVES`, then built from ``{"name": ..., **params}`` by
:func:`build_objective`. The registry lives here, below the trainer, so any family (distill, adapt,
condense) can add to it; the distillation objectives register when :mod:`attar.distill.objectives`
is imported.

Conventions shared by all objectives: labels ``y == -1`` mark unlabeled rows (cross-entropy
terms average over the labeled rows only, and a batch without one contributes exactly 0, not
NaN); all state lives in parameters/buffers of the objective (created in ``setup``), so the
trainer optimises and checkpoints it with the model and resume is exact. Students and teachers
are never registered as submodules of an objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attar.registry import Params, Registry

__all__ = ["Batch", "Objective", "OBJECTIVES", "register", "build_objective", "objective_fields", "masked_ce",
           "device_of", "CE"]


@dataclass
class Batch:
    x: torch.Tensor  # inputs exactly as the student sees them (after augmentation), in [0, 1] scale
    y: torch.Tensor  # int64 labels; -1 marks an unlabeled row (label-free / semi-supervised KD)
    idx: torch.Tensor  # int64 row indices into the stage's training set, stable across epochs
    teacher_logits: torch.Tensor | None = None  # [B, C] single teacher, [T, B, C] ensemble; None if no teacher


class Objective(nn.Module):
    """Base class. Learnable parts (projectors, extra heads) and state (e.g. PS-KD's
    previous-epoch predictions) are submodules/buffers, so the trainer optimises and
    checkpoints them with the model and resume stays exact. ``self.p`` holds the validated
    ``Params``."""

    Params: ClassVar[type[Params]] = Params
    name: ClassVar[str] = ""
    needs_teacher: bool = False
    #: True when the objective needs the teacher run live on the same batch (e.g. feature hooks),
    #: so cached teacher logits cannot replace it.
    needs_live_teacher: bool = False

    def __init__(self, params: Params | None = None):
        super().__init__()
        self.p = params if params is not None else self.Params()

    def setup(self, student: nn.Module, teachers: list[nn.Module], num_classes: int, train_size: int) -> None:
        """Called once before training (hooks, projectors, buffers sized to the data)."""

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Return named scalar losses; the key ``"loss"`` is what gets minimised."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int, num_epochs: int) -> None:
        """Called after each epoch (0-based ``epoch``)."""

    def finalize(self, student: nn.Module) -> nn.Module:
        """Return the model to save and evaluate (e.g. DHO folds its two heads into one)."""
        return student


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


#: ``@register("kd")``: add an objective class to :data:`OBJECTIVES` under ``name`` (also its ``name``).
register = OBJECTIVES.named


def build_objective(spec: dict[str, Any] | str) -> Objective:
    """``{"name": "kd", **params}`` -> a configured objective (not yet set up). A wrong or unknown field
    raises an ``AttarError`` naming it and every accepted field (:func:`attar.registry.validation_error`)."""
    return OBJECTIVES.build(spec)


def objective_fields(name: str) -> dict[str, dict[str, Any]]:
    """``{field: {type, default, required, description}}`` of objective ``name`` (for docs and ``attar methods``)."""
    return OBJECTIVES.fields(name)


def masked_ce(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labeled rows (``y >= 0``); exactly 0 if there are none.

    The zero keeps the graph (``logits.sum() * 0``) so ``.backward()`` works on any batch."""
    lab = y >= 0
    if not bool(lab.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[lab].float(), y[lab], label_smoothing=label_smoothing)


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter or buffer lives (CPU for an empty module): objectives create their
    buffers and projectors next to the student."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


@register("ce")
class CE(Objective):
    """Cross-entropy on the labels, ``−log softmax(z)_y`` averaged over labeled rows."""

    class Params(Params):
        label_smoothing: float = Field(0.0, ge=0, lt=1, description="mix this much uniform mass into the target")

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = masked_ce(logits, batch.y, self.p.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}
