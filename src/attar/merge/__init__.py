"""Model merging: soups, task arithmetic, TIES, DARE, SLERP, Fisher, fine-tuning transfer, test-time merging.

Streaming engine (:func:`run_merge`) for files on disk, :func:`merge_state_dicts`
for in-memory state dicts, model-level methods that need held-out data
(:func:`greedy_soup`, :func:`fisher_merge`, :func:`wise_ft_sweep`,
:func:`lcsc_search`) with their real-data callbacks (:func:`accuracy_evaluator`,
:func:`fisher_estimator`), and inference-time combinations: T³ test-time
merging (:class:`TestTimeMerge`) and logit fusion (:class:`EmulatedFineTune`,
:class:`LogitArithmetic`). See docs/merge.md.
"""

from attar.merge.config import MergeConfig, load_merge_config
from attar.merge.evaluators import accuracy_evaluator, evaluator_for, finetune, fisher_estimator, state_dicts
from attar.merge.logit_fusion import EmulatedFineTune, LogitArithmetic, eft_log_probs, fuse_log_probs
from attar.merge.stage import merge_models
from attar.merge.test_time import TestTimeMerge, js_divergence, static_interpolation, t3_coefficients
from attar.merge.engine import MergeResult, merge_state_dicts, merge_tensor, run_merge
from attar.merge.sources import open_source
from attar.merge.tensor_source import TensorSource
from attar.merge.writer import ShardWriter
from attar.merge.methods import (
    MERGE_METHODS,
    Evaluator,
    FisherEstimator,
    MergeMethod,
    ModelMergeResult,
    diagonal_fisher,
    fisher_merge,
    greedy_soup,
    lcsc_search,
    wise_ft_sweep,
)

__all__ = [
    "EmulatedFineTune",
    "LogitArithmetic",
    "MERGE_METHODS",
    "TestTimeMerge",
    "accuracy_evaluator",
    "eft_log_probs",
    "evaluator_for",
    "finetune",
    "fisher_estimator",
    "fuse_log_probs",
    "js_divergence",
    "state_dicts",
    "static_interpolation",
    "t3_coefficients",
    "Evaluator",
    "FisherEstimator",
    "MergeConfig",
    "MergeMethod",
    "MergeResult",
    "ModelMergeResult",
    "ShardWriter",
    "TensorSource",
    "diagonal_fisher",
    "fisher_merge",
    "greedy_soup",
    "lcsc_search",
    "load_merge_config",
    "merge_models",
    "merge_state_dicts",
    "merge_tensor",
    "open_source",
    "run_merge",
    "wise_ft_sweep",
]
