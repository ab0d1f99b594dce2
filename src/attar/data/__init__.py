"""Data: built-in real data sets, file sources, deterministic splits and batch augmentations.

``load_data(DataSpec) -> DataBundle`` is the one entry point; everything is held in
memory as tensors in [0, 1] scale (see docs/architecture.md).
"""

from attar.data.builtin import BUILTINS, BuiltinDataset
from attar.data.bundle import DataBundle, Split, train_stats
from attar.data.load import list_datasets, load_data
from attar.data.transforms import (
    AUGMENTS,
    Augment,
    crop_at,
    crop_offsets,
    default_crop_padding,
    hflip,
    make_augment,
    normalize,
    random_crop,
)

__all__ = [
    "AUGMENTS",
    "Augment",
    "BUILTINS",
    "BuiltinDataset",
    "DataBundle",
    "Split",
    "crop_at",
    "crop_offsets",
    "default_crop_padding",
    "hflip",
    "list_datasets",
    "load_data",
    "make_augment",
    "normalize",
    "random_crop",
    "train_stats",
]
