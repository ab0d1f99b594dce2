"""Static data pruning: score every training row once before training, keep a ``keep`` fraction, train
on that subset for the whole stage.

Scores (``score``):

* ``random``: a uniformly random subset (seeded from the stage seed). With KD from a teacher trained on
  the full data this is the strong baseline of KD-Pruning (Ben-Baruch et al., "Distilling the Knowledge
  in Data Pruning", 2024).
* ``el2n``: ``||softmax(f(x)) - onehot(y)||_2`` of a *probe* model trained for ``probe_epochs`` epochs
  (Paul et al. 2021, "Deep Learning on a Data Diet"; they average over several probe seeds, here one).
* ``loss``: the probe model's cross-entropy on the row.
* ``forgetting``: forgetting events during the probe run (Toneva et al. 2019): the number of times a
  row goes from correctly to wrongly classified between presentations, read from the probe's own
  training forward passes (no extra forward); rows never classified correctly count as most forgettable.

``keep_hardest`` (default true) keeps the highest-scoring rows; false keeps the easiest, which the
pruning literature finds better at small kept fractions. Ties are broken by a seeded random jitter.
``balanced`` (default true) ranks rows within their class and keeps the same fraction of every class
(quotas by largest remainder, adding up to exactly ``ceil(keep * n)``): scores are not comparable across
classes, and an unbalanced cut can drop whole classes at small fractions. Unlabeled rows form a class
of their own.

The probe is a copy of the stage's *initial* model trained with AdamW at the stage's learning rate and
batch size, on labeled rows, without touching the real model or the global RNG: an inner Trainer run that
sees every row once per epoch, with a :class:`~attar.train.callbacks.ForgettingCounter` callback. Its cost is accounted:
``probe_train_rows`` (forward+backward rows), ``scoring_forward_rows`` (the final scoring pass),
``probe_seconds`` (also included in ``select_seconds``). The kept rows are checkpointed, so a resumed
run neither repeats the probe nor changes the subset.

KD-Pruning: combine with a distillation objective, e.g. ``objective: {name: kd, alpha: 0.3}``; the KD
weight is ``1 - alpha``. KD-Pruning finds that the best KD weight grows as the kept fraction shrinks.
"""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.errors import AttarError
from attar.rng import seed_of
from attar.select.base import SELECTORS, FixedSubset, SelectorParams
from attar.rng import generator as generator_for
from attar.train.callbacks import ForgettingCounter
from attar.train.config import TrainConfig
from attar.train.objective import CE
from attar.train.trainer import Trainer, predict


class PruneParams(SelectorParams):
    keep: float = Field(0.5, gt=0, le=1, description="fraction of the training rows kept for the whole stage")
    score: Literal["random", "el2n", "loss", "forgetting"] = Field("random", description="how rows are ranked")
    keep_hardest: bool = Field(True, description="keep the highest-scoring rows (false: the lowest)")
    probe_epochs: int = Field(2, ge=1, description="epochs of the probe run (el2n, loss, forgetting)")
    balanced: bool = Field(True, description="keep the same fraction of every class (false: rank all rows together)")


@SELECTORS.register("prune")
class Prune(FixedSubset):
    """Keep a fixed, scored ``keep`` fraction of the rows for the whole stage."""

    Params = PruneParams

    def __init__(self, params: PruneParams):
        super().__init__(params)
        self.stats.update({"probe_train_rows": 0, "probe_seconds": 0.0})
        self._trainer = None
        self._probe_model = None

    def _need_labels(self, labels: torch.Tensor) -> None:
        if self.p.score != "random" and bool((labels < 0).any()):
            raise AttarError(
                f"score: selector 'prune' with score {self.p.score!r} needs a label on every training row (the probe "
                "run trains on labels); use score: random for unlabeled pools (scores: random, el2n, loss, forgetting)."
            )

    def check(self, *, stage=None, objective=None, input_shape=None, labels=None) -> None:
        if labels is not None and (objective is None or objective.needs_teacher):
            self._need_labels(labels)  # a teacher-free objective drops unlabeled rows itself

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self._trainer = trainer
        if self.p.score != "random":
            try:
                self._need_labels(trainer.y)
            except AttarError as e:
                raise AttarError(f"stage {trainer.name!r}: {e}") from None
            self._probe_model = copy.deepcopy(trainer.model)  # the initial weights, before any step

    # -- scoring -------------------------------------------------------------------------------
    def _probe_scores(self) -> torch.Tensor:
        """Train the probe (an ordinary inner Trainer run; forgetting events are read by a callback), then score."""
        tr = self._trainer
        model, x, y, n = self._probe_model, tr.x, tr.y, len(tr.y)
        cfg = TrainConfig(epochs=self.p.probe_epochs, batch_size=tr.cfg.batch_size, optimizer="adamw", lr=tr.cfg.lr,
                          weight_decay=tr.cfg.weight_decay, schedule="constant")
        counter = ForgettingCounter(n)
        res = Trainer(model, CE(), x, y, cfg, seed=seed_of(self.seed, "prune-probe"), augment=tr.augment,
                      name=f"{tr.name}: prune probe", callbacks=[counter], drop_last=False, inner=True,
                      order=lambda e: torch.randperm(n, generator=generator_for(self.seed, "prune-probe", e))).fit()
        self.stats["probe_train_rows"] += res.samples_seen
        if self.p.score == "forgetting":
            return counter.scores()
        logits = predict(model, x).float().cpu()
        self.stats["scoring_forward_rows"] += n
        if self.p.score == "loss":
            return F.cross_entropy(logits, y.cpu(), reduction="none")
        err = torch.softmax(logits, 1) - F.one_hot(y.cpu(), logits.shape[1]).float()
        return err.norm(dim=1)

    def rank_key(self, n: int) -> torch.Tensor:
        jitter = torch.rand(n, generator=generator_for(self.seed, "prune-ties"), dtype=torch.float64)
        if self.p.score == "random":
            return jitter
        t0 = time.perf_counter()
        s = self._probe_scores().double()
        self.row_scores = s.float()
        self.stats["probe_seconds"] += time.perf_counter() - t0
        self._probe_model = None
        scale = (s.max() - s.min()).clamp(min=1e-12)
        return (s if self.p.keep_hardest else -s) + 1e-9 * scale * jitter

    def balance_labels(self) -> torch.Tensor:
        return self._trainer.y

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        if "kept" in tensors:
            self._probe_model = None
