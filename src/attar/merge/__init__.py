"""Model merging: soups, task arithmetic, TIES, DARE, SLERP, Fisher, fine-tuning transfer.

Streaming engine (:func:`run_merge`) for files on disk, :func:`merge_state_dicts`
for in-memory state dicts, and model-level methods that need held-out data
(:func:`greedy_soup`, :func:`fisher_merge`, :func:`wise_ft_sweep`,
:func:`lcsc_search`). See docs/merge.md.
"""

from attar.merge.config import MergeConfig, load_merge_config
from attar.merge.engine import MergeResult, merge_state_dicts, merge_tensor, run_merge
from attar.merge.io import ShardWriter, TensorSource, open_source
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
    "MERGE_METHODS",
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
    "merge_state_dicts",
    "merge_tensor",
    "open_source",
    "run_merge",
    "wise_ft_sweep",
]
