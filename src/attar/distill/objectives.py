"""Every training objective, registered: import this module (not a single objective file) to build any of
them by name.

Cross-entropy and the registry live at the train layer (:mod:`attar.train.objective`); each distillation
objective is one file here that registers into the same :data:`OBJECTIVES`: :mod:`~attar.distill.kd`
(``kd``, ``label_free``, ``ensemble``), :mod:`~attar.distill.pskd`, :mod:`~attar.distill.dho` and
:mod:`~attar.distill.feature` (``feature``, ``nd``). Build one from a recipe mapping with
:func:`build_objective` (``{"name": "kd", "temperature": 4}``).
"""

from __future__ import annotations

from attar.distill.dho import DHO
from attar.distill.feature import ND, FeatureKD, HookedKD, nd_loss
from attar.distill.kd import KD, Ensemble, LabelFree, teacher_target
from attar.distill.pskd import PSKD
from attar.train.objective import CE, OBJECTIVES, Batch, Objective, build_objective, masked_ce, objective_fields

__all__ = [
    "OBJECTIVES",
    "build_objective",
    "objective_fields",
    "teacher_target",
    "masked_ce",
    "nd_loss",
    "Batch",
    "Objective",
    "CE",
    "KD",
    "LabelFree",
    "Ensemble",
    "PSKD",
    "DHO",
    "HookedKD",
    "FeatureKD",
    "ND",
]
