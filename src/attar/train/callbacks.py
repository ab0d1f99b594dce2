"""Callbacks: code that watches an ordinary Trainer run instead of writing a loop of its own.

Four hooks: ``on_batch_end`` (after each micro-batch's losses, with the model's outputs on it),
``on_step_end`` (after each optimizer step; may end the run with ``trainer.request_stop``), ``on_epoch_end``
(after the epoch's last step, before its checkpoint) and ``on_train_end``. What a callback
records goes into the Trainer's checkpoints through ``state_tensors``/``load_state_tensors``, so a run
interrupted and resumed records exactly what an uninterrupted one does.

* :class:`Trajectory`: the flattened parameters after every epoch (the expert trajectories of
  trajectory matching, :mod:`attar.condense.experts`).
* :class:`ForgettingCounter`: per row, how often it went from correctly to wrongly classified between
  presentations (Toneva et al. 2019; the forgetting score of :mod:`attar.select.prune`).
"""

from __future__ import annotations

import torch
from torch import nn

from attar.train.objective import Batch


class Callback:
    def on_batch_end(self, trainer, batch: Batch, outputs: torch.Tensor | None, losses: dict[str, torch.Tensor]) -> None:
        """After each micro-batch; ``outputs`` are the model's outputs on ``batch`` (None for MeZO steps)."""

    def on_step_end(self, trainer, step: int) -> None:
        """After optimizer step ``step`` (1-based), before that step's checkpoint; ``trainer.request_stop`` ends the run."""

    def on_epoch_end(self, trainer, epoch: int) -> None:
        """After the last step of ``epoch`` (0-based), before the epoch's checkpoint."""

    def on_train_end(self, trainer) -> None:
        """Once, after the last step (e.g. restore the best weights seen)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


def flatten_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Trajectory(Callback):
    """``model``'s parameters now (row 0) and after every epoch: ``stack()`` is ``[epochs + 1, P]`` (CPU)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.rows = [flatten_params(model).cpu()]

    def on_epoch_end(self, trainer, epoch: int) -> None:
        self.rows.append(flatten_params(self.model).cpu())

    def stack(self) -> torch.Tensor:
        return torch.stack(self.rows)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"trajectory": self.stack()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rows = list(tensors["trajectory"].unbind(0))


class ForgettingCounter(Callback):
    """Forgetting events of ``n`` rows, read from the run's own training forward passes (no extra forward)."""

    def __init__(self, n: int):
        self.forgets = torch.zeros(n)
        self.prev = torch.zeros(n, dtype=torch.bool)
        self.ever = torch.zeros(n, dtype=torch.bool)

    def on_batch_end(self, trainer, batch, outputs, losses) -> None:
        rows = batch.idx.cpu()
        correct = (outputs.detach().argmax(1) == batch.y).cpu()
        self.forgets[rows] += (self.prev[rows] & ~correct).float()
        self.prev[rows] = correct
        self.ever[rows] |= correct

    def scores(self) -> torch.Tensor:
        """Forgetting events per row; rows never classified correctly count as the most forgettable."""
        return torch.where(self.ever, self.forgets, self.forgets.max() + 1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"forgets": self.forgets, "prev": self.prev.to(torch.uint8), "ever": self.ever.to(torch.uint8)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.forgets, self.prev, self.ever = tensors["forgets"], tensors["prev"].bool(), tensors["ever"].bool()
