"""In-memory data containers shared by every part of attar.

Whole data sets live in memory as tensors: the sets attar targets (Fashion-MNIST,
condensed synthetic sets, tables) are small, and plain tensors make batching,
augmentation and distributed sharding trivial and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attar.errors import AttarError


@dataclass
class Split:
    """One split: ``x`` float32 [N, C, H, W] (images, [0, 1] scale) or [N, D] (tables), ``y`` int64 [N].

    A label of ``-1`` marks an unlabeled row (semi-supervised / label-free distillation pools).
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        # Checked here so a malformed split fails where it is built, not deep inside a training step.
        if self.x.dtype != torch.float32:
            raise AttarError(f"Split.x must be float32, got {self.x.dtype}")
        if self.y.dtype != torch.int64:
            raise AttarError(f"Split.y must be int64, got {self.y.dtype}")
        if self.x.dim() not in (2, 4):
            raise AttarError(f"Split.x must be [N, C, H, W] or [N, D], got shape {tuple(self.x.shape)}")
        if self.y.dim() != 1 or self.y.shape[0] != self.x.shape[0]:
            raise AttarError(f"Split.y must be [N] with N = {self.x.shape[0]} rows of x, got {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labeled(self) -> torch.Tensor:
        """Boolean mask of rows that carry a label."""
        return self.y >= 0

    @property
    def num_labeled(self) -> int:
        return int(self.labeled.sum())

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index], list(self.classes))


@dataclass
class DataBundle:
    """Train / val / test splits plus what a model needs to be built for them.

    ``mean``/``std`` are computed on the train split and broadcast against one sample
    ([C, 1, 1] for images, [D] for tables); models put them in their first layer.
    """

    train: Split
    val: Split
    test: Split
    classes: list[str]
    input_shape: tuple[int, ...]
    mean: torch.Tensor
    std: torch.Tensor
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


def train_stats(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or per-feature (tables) mean and std over the train split.

    Two passes (mean, then squared deviations) so table features with large offsets do
    not lose their variance to cancellation; chunks are summed in float32 (torch sums
    pairwise) and accumulated in float64, so 60k images need no float64 copy. A
    (near-)constant channel or feature gets std 1, as in scikit-learn's StandardScaler,
    so normalising never divides by ~0.
    """
    if x.shape[0] == 0:
        raise AttarError("cannot compute normalisation statistics: the train split is empty")
    n, per = x.shape[0], x.shape[1]
    flat = x.reshape(n, per, -1)
    count = n * flat.shape[2]
    s = torch.zeros(per, dtype=torch.float64)
    for start in range(0, n, chunk):
        s += flat[start : start + chunk].sum(dim=(0, 2)).double().cpu()
    mean = s / count
    m32 = mean.to(x.device, torch.float32)[None, :, None]
    ss = torch.zeros(per, dtype=torch.float64)
    for start in range(0, n, chunk):
        ss += (flat[start : start + chunk] - m32).square().sum(dim=(0, 2)).double().cpu()
    std = (ss / count).sqrt()
    std = torch.where(std < 1e-6 * mean.abs().clamp_min(1.0), torch.ones_like(std), std)
    mean, std = mean.float(), std.float()
    if x.dim() == 4:
        mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    return mean, std
