"""Recipe stage kinds, one file each, in the :data:`STAGES` registry (see base.py for the contract)."""

from attar.stages import condense, finetune, lm, merge, train  # noqa: F401  (registration)
from attar.stages.base import (
    STAGES,
    EarlierStage,
    StageContext,
    StageInputs,
    StageKind,
    StageResult,
)

__all__ = ["STAGES", "EarlierStage", "StageContext", "StageInputs", "StageKind", "StageResult"]
