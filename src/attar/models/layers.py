"""Input-side layers and the wrapper every attar model is returned in.

Why: data loaders hand models [0, 1] inputs; whatever a model expects beyond
that (per-channel normalisation, a fixed resolution, three channels) is done
*inside* the model, with buffers saved alongside the weights, so a saved model
is self-contained and the trainer never has to know how to preprocess.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attar.errors import AttarError


def _as_vector(v: float | Sequence[float], what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 0:
        raise AttarError(f"Normalize {what} is empty; give one value per channel (e.g. [0.5, 0.5, 0.5]).")
    return t


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean/std stored as buffers.

    ``mean``/``std`` hold one value per channel (or one value for all). For
    image batches ``[N, C, H, W]`` they broadcast over C; for flat batches
    ``[N, D]`` over D, so the same layer serves tabular inputs.
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        super().__init__()
        m, s = _as_vector(mean, "mean"), _as_vector(std, "std")
        if m.numel() != s.numel() and 1 not in (m.numel(), s.numel()):
            raise AttarError(f"Normalize got {m.numel()} means but {s.numel()} stds; give one of each per channel.")
        if bool((s <= 0).any()):
            raise AttarError(f"Normalize std must be > 0 for every channel, got {s.tolist()}.")
        n = max(m.numel(), s.numel())
        self.register_buffer("mean", m.expand(n).clone())
        self.register_buffer("std", s.expand(n).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.tolist()]}, std={[round(v, 4) for v in self.std.tolist()]}"


class Resize(nn.Module):
    """Bilinear resize to a fixed ``(H, W)``: lets an ImageNet-sized teacher take small images."""

    def __init__(self, size: int | tuple[int, int]):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class RepeatChannels(nn.Module):
    """Repeat a single grey channel to ``channels`` (an RGB teacher on grey images)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, *x.shape[2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class AttarModel(nn.Sequential):
    """``pre`` (input preprocessing, possibly empty) followed by ``net`` (the network proper).

    Every model attar builds or loads is one of these, so module paths are the
    same whether or not normalisation is present: hooks target
    ``net.<path inside the architecture>`` (e.g. ``net.features.3``,
    ``net.layer2``, ``net.classifier``) and ``pre.normalize`` is the
    Normalize layer when there is one. The inner net provides ``head_name``
    (path of its final Linear), ``stage_names`` (paths whose outputs are the
    main intermediate representations) and ``forward_features`` (the
    penultimate vector fed to the head).

    Plain attributes ``spec``, ``input_shape``, ``num_classes``, ``mean``,
    ``std`` record how it was built so :func:`attar.models.save_model` needs no
    extra arguments; they are not part of the state dict.
    """

    def __init__(
        self,
        pre: nn.Sequential,
        net: nn.Module,
        *,
        spec: Any = None,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ):
        super().__init__(OrderedDict(pre=pre, net=net))
        self.spec = spec
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes
        self.mean = mean
        self.std = std

    @property
    def head_path(self) -> str:
        """Module path of the final Linear layer, e.g. ``net.classifier`` or ``net.fc``."""
        return "net." + self.net.head_name

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_path)

    @property
    def stage_paths(self) -> list[str]:
        """Module paths of the main intermediate outputs, shallow to deep (for feature-distillation hooks)."""
        return ["net." + n for n in self.net.stage_names]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate feature vector ``[N, D]`` (what the head sees), e.g. for distribution matching."""
        return self.net.forward_features(self.pre(x))
