"""The narrow interface between the trainer and every training method.

The trainer builds a :class:`Batch`, runs the student, and hands both to an
:class:`Objective`, which returns named losses. Cross-entropy, KD with any
divergence, feature KD, self-distillation and dual-head training are all
objectives; the trainer never knows which one it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Batch:
    x: torch.Tensor  # inputs exactly as the student sees them (after augmentation), in [0, 1] scale
    y: torch.Tensor  # int64 labels; -1 marks an unlabeled row (label-free / semi-supervised KD)
    idx: torch.Tensor  # int64 row indices into the stage's training set, stable across epochs
    teacher_logits: torch.Tensor | None = None  # [B, C] single teacher, [T, B, C] ensemble; None if no teacher


class Objective(nn.Module):
    """Base class. Learnable parts (projectors, extra heads) and state (e.g. PS-KD's
    previous-epoch predictions) are submodules/buffers, so the trainer optimises and
    checkpoints them with the model and resume stays exact."""

    needs_teacher: bool = False
    #: True when the objective needs the teacher run live on the same batch (e.g. feature hooks),
    #: so cached teacher logits cannot replace it.
    needs_live_teacher: bool = False

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
