"""What many trainer tests share: plain cross-entropy as an Objective and sklearn's digits as tensors (fast, real)."""

from __future__ import annotations

import torch
from torch import nn

from attar.train.objective import Objective


class CE(Objective):
    def forward(self, batch, logits):
        return {"loss": nn.functional.cross_entropy(logits, batch.y)}


def digits(images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits in [0, 1]: flat 64-vectors, or ``images`` of shape [1, 8, 8]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return (x.view(-1, 1, 8, 8) if images else x), torch.tensor(d.target)
