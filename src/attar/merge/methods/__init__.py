"""Merge methods, one file each (the task-vector presets share ``task_vector.py``), all registered in ``MERGE_METHODS``.

Importing this package registers every built-in method.
"""

from attar.merge.methods.base import (
    MERGE_METHODS,
    Evaluator,
    FisherEstimator,
    MergeMethod,
    StateDict,
    TensorInputs,
    register,
    stable_seed,
    tensor_method,
)
from attar.merge.methods import (  # noqa: F401  (registration side effects)
    adamerging,
    arcee_fusion,
    della,
    fisher,
    karcher,
    lcsc,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    regmean,
    regmean_plusplus,
    sce,
    slerp,
    soup,
    task_vector,
    wise_ft,
)
from attar.merge.methods.params import REQUIRED
from attar.merge.methods.adamerging import adamerging as adamerging_merge
from attar.merge.methods.fisher import diagonal_fisher, fisher_merge
from attar.merge.methods.regmean import input_grams, regmean_merge
from attar.merge.methods.regmean_plusplus import regmean_plusplus as regmean_plusplus_merge
from attar.merge.methods.lcsc import lcsc_search
from attar.merge.methods.slerp import slerp_tensors
from attar.merge.methods.soup import ModelMergeResult, greedy_soup
from attar.merge.methods.wise_ft import wise_ft as wise_ft_sweep

__all__ = [
    "MERGE_METHODS",
    "REQUIRED",
    "Evaluator",
    "FisherEstimator",
    "MergeMethod",
    "ModelMergeResult",
    "StateDict",
    "TensorInputs",
    "adamerging_merge",
    "diagonal_fisher",
    "fisher_merge",
    "greedy_soup",
    "input_grams",
    "lcsc_search",
    "regmean_merge",
    "regmean_plusplus_merge",
    "register",
    "slerp_tensors",
    "stable_seed",
    "tensor_method",
    "wise_ft_sweep",
]
