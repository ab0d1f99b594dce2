"""Teacher-student disagreement: for distillation stages, train on the rows where the student is
furthest from its teacher.

Each step draws ``ceil(batch_size / keep)`` candidates, runs the student once without gradients, and
keeps the ``batch_size`` rows with the largest per-sample divergence ``D(teacher || student)`` at
``temperature`` (any per-sample divergence of :mod:`attar.distill.divergences`; ``divergence_args`` are
passed through). An ensemble of teachers is compared through its averaged probabilities, as the ``kd``
objective does. The teacher logits are the batch's (cached or live), so selection costs one student
forward over the candidates and no teacher forward beyond what the objective already needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator

from attar.distill.divergences import DIVERGENCES, divergence, is_batchwise
from attar.distill.objectives import teacher_target
from attar.errors import AttarError
from attar.select.base import SELECTORS, Selector, SelectorParams
from attar.train.objective import Batch


class DisagreementParams(SelectorParams):
    keep: float = Field(0.5, gt=0, le=1, description="fraction of candidate rows trained on")
    divergence: str = Field("kl", description="per-sample divergence (kl, reverse_kl, js, gjsd, tvd, ...)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions")
    divergence_args: dict[str, Any] = Field(default_factory=dict, description="extra divergence parameters")

    @field_validator("divergence")
    @classmethod
    def _known(cls, v: str) -> str:
        DIVERGENCES.get(v)  # unknown names list the known ones
        if is_batchwise(v):
            raise ValueError(f"divergence {v!r} is batch-wise and has no per-sample value; use kl, js, tvd, ...")
        return v

    @model_validator(mode="after")
    def _args(self) -> "DisagreementParams":
        try:  # the divergence checks its own extra parameters; try them on a dummy row
            divergence(self.divergence, torch.zeros(1, 2), torch.zeros(1, 2), self.temperature, "none",
                       **self.divergence_args)
        except AttarError as e:
            raise ValueError(str(e)) from None
        return self


@SELECTORS.register("disagreement")
class Disagreement(Selector):
    """Keep the candidates with the largest teacher-student divergence."""

    Params = DisagreementParams
    scores_with_model = True

    @staticmethod
    def _no_teacher(what: str) -> AttarError:
        others = ", ".join(n for n in SELECTORS.names() if n != "disagreement")
        return AttarError(
            f"name: selector 'disagreement' compares the student with its teacher, but {what}. Use it in a "
            f"distill stage (kind: distill, teacher: <stage or model spec>, objective kd), or pick a selector that "
            f"needs no teacher: {others}."
        )

    def check(self, *, stage=None, objective=None, input_shape=None, labels=None) -> None:
        if objective is not None and not objective.needs_teacher:
            raise self._no_teacher(f"the objective {type(objective).__name__} uses no teacher")
        if stage is not None and not stage.teachers():
            raise self._no_teacher(f"stage {stage.name!r} has no teacher")

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if not trainer.objective.needs_teacher:
            raise AttarError(f"stage {trainer.name!r}: {self._no_teacher('the objective uses no teacher')}")

    def candidates(self, batch_size: int) -> int:
        return max(batch_size, math.ceil(batch_size / self.p.keep))

    def divergences(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        target = teacher_target(batch.teacher_logits, logits, self.p.temperature, "disagreement selector")
        return divergence(self.p.divergence, logits.float(), target, self.p.temperature, reduction="none",
                          **self.p.divergence_args)

    def select(self, batch: Batch, logits: torch.Tensor | None, keep_n: int) -> torch.Tensor:
        assert logits is not None
        if keep_n >= len(batch.y):
            return torch.arange(len(batch.y))
        d = self.divergences(batch, logits)
        return torch.topk(d, keep_n, sorted=False).indices.sort().values
