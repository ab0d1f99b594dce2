"""Static data selection from a stored teacher pass: rank the training rows by how unsure the teacher was on them,
read from a classifier store (``attar teacher dump``, :mod:`attar.distill.cls_store`) instead of running a teacher
or a probe model, and train on a ``keep`` fraction for the whole stage. The same store a ``distill`` stage reads as
its teacher (``teacher: {store: DIR}``) serves here: one teacher pass, several uses.

Scores per row, from the stored distribution ``p̂`` (top-k at their classes, the tail spread evenly over the other
``C − k``; with ``k = C`` it is the teacher's own):

* ``entropy``: ``H(p̂) = −Σ_c p̂_c log p̂_c`` (nats); high = the teacher is unsure.
* ``margin``: ``p̂_(1) − p̂_(2)``, the top-1 minus the runner-up probability (needs ``k >= 2``); low = unsure.

``keep_hardest`` (default true) keeps the unsure rows (high entropy, low margin); false the confident ones.
``balanced`` (default true) keeps the same fraction of every class (:func:`attar.select.base.balanced_top`).
Ties are broken by a seeded jitter. The kept rows are checkpointed, so a resumed run keeps the subset.
Cost: no forward pass at all (``scoring_forward_rows`` stays 0); reading the store is counted in ``select_seconds``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from attar.distill.cls_store import StoredClassifierTeacher
from attar.errors import AttarError
from attar.select.base import SELECTORS, FixedSubset, SelectorParams
from attar.rng import generator as generator_for


class StoredTeacherParams(SelectorParams):
    store: str = Field(..., description="a classifier store dumped on this stage's training rows (attar teacher dump)")
    keep: float = Field(0.5, gt=0, le=1, description="fraction of the training rows kept for the whole stage")
    score: Literal["entropy", "margin"] = Field("entropy", description="how unsure the teacher was on the row")
    keep_hardest: bool = Field(True, description="keep the rows the teacher was least sure of (false: most sure)")
    balanced: bool = Field(True, description="keep the same fraction of every class (false: rank all rows together)")


def stored_scores(reader: StoredClassifierTeacher, score: str, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``entropy`` or ``margin`` (module doc) of rows ``idx`` (default: all) from the stored distribution."""
    idx = torch.arange(len(reader)) if idx is None else torch.as_tensor(idx)
    if score == "margin":
        if reader.k < 2:
            raise AttarError(f"score margin needs the top-2 of each row; the store {reader.folder} keeps k=1. Dump "
                             "with --k 2 or more, or use score: entropy.")
        v = reader.topk(idx)[0].double().exp()
        top2 = v.topk(2, dim=1).values
        return (top2[:, 0] - top2[:, 1]).float()
    if score != "entropy":
        raise AttarError(f"score must be entropy or margin, got {score!r}.")
    lp = reader.log_probs(idx).double()
    return -(lp.exp() * lp).sum(1).float()


@SELECTORS.register("stored_teacher")
class StoredTeacher(FixedSubset):
    """Keep the ``keep`` fraction of rows a stored teacher pass was least (or most) sure of, for the whole stage."""

    Params = StoredTeacherParams

    def __init__(self, params: StoredTeacherParams):
        super().__init__(params)
        self._reader: StoredClassifierTeacher | None = None
        self._y: torch.Tensor | None = None

    def _open(self) -> StoredClassifierTeacher:
        if self._reader is None:
            try:
                self._reader = StoredClassifierTeacher(self.p.store)
            except AttarError as e:
                raise AttarError(f"store: selector 'stored_teacher': {e}") from None
            if self.p.score == "margin" and self._reader.k < 2:
                stored_scores(self._reader, "margin", torch.zeros(0, dtype=torch.long))  # raises, naming the fix
        return self._reader

    def check(self, *, stage=None, objective=None, input_shape=None, labels=None) -> None:
        self._open()

    def setup(self, trainer) -> None:
        super().setup(trainer)
        reader = self._open()
        why = reader.mismatch(x=trainer.x, num_classes=trainer.num_classes or None)
        if why:
            raise AttarError(f"stage {trainer.name!r}: selector 'stored_teacher' cannot use the store {reader.folder}: "
                             f"{why}. Dump the teacher on this stage's training rows (attar teacher dump).")
        self._y = trainer.y

    def rank_key(self, n: int) -> torch.Tensor:
        s = stored_scores(self._open(), self.p.score).double()
        self.row_scores = s.float()
        hard = s if self.p.score == "entropy" else -s  # larger = the teacher less sure
        jitter = torch.rand(n, generator=generator_for(self.seed, "stored-teacher-ties"), dtype=torch.float64)
        scale = (hard.max() - hard.min()).clamp(min=1e-12)
        return (hard if self.p.keep_hardest else -hard) + 1e-9 * scale * jitter

    def balance_labels(self) -> torch.Tensor | None:
        return self._y
