"""Tasks: what a run trains on, in the spirit of torchtitan's train spec.

A task turns the rows the Trainer picked into a :class:`Batch` and ``(model, objective, batch)`` into
named losses. The Trainer decides *which* rows (order, shards, labeled stream, selectors) and *when*
(steps, schedule, checkpoints); the task decides *what a row is* (an image or tabular row with a class
label today; a token sequence for the language-model task of a later issue), so a new kind of data plugs
in here without a second loop.
"""

from __future__ import annotations

import torch
from torch import nn

from attar.metrics import classification_metrics
from attar.train.objective import Batch, Objective, device_of


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs on ``x`` in batches, run where the model lives and returned where ``x`` lives."""
    was = model.training
    model.eval()
    dev = device_of(model)
    out = torch.cat([model(x[i : i + batch_size].to(dev)).to(x.device) for i in range(0, len(x), batch_size)]) \
        if len(x) else torch.empty(0)
    model.train(was)
    return out



class Task:
    """Base class: ``batch`` (rows -> Batch) and ``forward`` ((model, objective, batch) -> losses, outputs)."""

    def batch(self, trainer, rows: torch.Tensor, epoch: int, micro: int) -> Batch:  # pragma: no cover
        raise NotImplementedError

    def forward(self, model: nn.Module, objective: Objective, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits = model(batch.x)
        return objective(batch, logits), logits

    def evaluate(self, trainer) -> dict[str, float]:
        """Validation metrics after an epoch: accuracy and NLL of the logits on ``trainer.val`` ({} without one)."""
        if trainer.val is None or len(trainer.val[0]) == 0:
            return {}
        m = classification_metrics(predict(trainer.model, trainer.val[0]), trainer.val[1])
        return {"val_accuracy": m["accuracy"], "val_nll": m["nll"]}

    def spec(self) -> dict | None:
        """Settings a checkpoint must agree on to be resumed with this task (None: nothing beyond the config)."""
        return None

    #: True when ``batch`` reads from outside the process (a served teacher) and may raise ``InputUnavailable``:
    #: under torchrun the ranks then agree on every micro-batch whether all of them got their input, so all stop
    #: together at the same step's checkpoint instead of one stopping while the others wait in a collective.
    external_input: bool = False


class Classification(Task):
    """Rows of in-memory tensors (``trainer.x``: images, tabular rows or token ids; ``trainer.y``: class ids).

    The rows move to the model's device, are augmented with a generator of ``(seed, epoch, micro, rank)``
    (so a resumed run draws the same augmentation), and get their teachers' logits from the cache or from
    the teachers run live on the exact (augmented) inputs.
    """

    def batch(self, trainer, rows: torch.Tensor, epoch: int, micro: int) -> Batch:
        x, y = trainer.x[rows].to(trainer.device), trainer.y[rows].to(trainer.device)
        if trainer.augment is not None:
            x = trainer.augment(x, trainer.generator(3, epoch, micro, trainer.rank))
        teacher_logits = None
        if trainer.teacher_cache is not None:
            teacher_logits = trainer.teacher_cache.logits(rows).to(trainer.device)
        elif trainer.objective.needs_teacher:
            with torch.no_grad():
                outs = [t(x) for t in trainer.teachers]
            teacher_logits = outs[0] if len(outs) == 1 else torch.stack(outs)
        return Batch(x=x, y=y, idx=rows, teacher_logits=teacher_logits)

