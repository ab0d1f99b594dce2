"""Architectures built from scratch: ``mlp``, ``convnet``, ``resnet``.

Every builder has the signature ``(input_shape, num_classes, **kwargs) -> nn.Module``
and returns the bare network (no input normalisation; :func:`attar.models.build_model`
wraps it). Each network exposes ``head_name`` (path of its final Linear),
``stage_names`` (paths of its main intermediate outputs) and
``forward_features(x)`` (the penultimate vector), which ``AttarModel`` relies on.

ReLUs are not in-place, so a forward hook on any layer sees that layer's own output.

Module naming (paths relative to ``net.`` in a built model):

* ``mlp``: ``flatten``, ``body.{2i}`` Linear / ``body.{2i+1}`` ReLU for hidden layer i, ``classifier``.
* ``convnet``: ``features.{4i+k}`` for block i with k = 0 conv, 1 norm, 2 relu, 3 pool
  (norm/pool are ``Identity`` when absent, so indices never shift), ``flatten``, ``classifier``.
  Flat ``features`` with these indices matches the reference DC/DM/MTT ConvNet state dicts.
* ``resnet``: ``conv1``, ``bn1``, ``relu``, ``layer{1,2,3}.{j}`` BasicBlocks (each with
  ``conv1 bn1 conv2 bn2 shortcut``), ``pool``, ``flatten``, ``fc``.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

from attar.errors import AttarError
from attar.registry import Registry

Builder = Callable[..., nn.Module]

ARCHS: Registry[Builder] = Registry("architecture")


def check_kwargs(family: str, name: str, fn: Callable[..., Any], kwargs: dict[str, Any], hidden: tuple[str, ...] = ()) -> None:
    """Reject keyword arguments ``fn`` does not take, listing the accepted ones (typos fail loudly)."""
    params = inspect.signature(fn).parameters
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in hidden]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise AttarError(
            f"{family} {name!r} got unknown argument(s) {', '.join(map(repr, bad))}. "
            f"Accepted: {', '.join(accepted) or '(none)'}."
        )


def _register(name: str) -> Callable[[Builder], Builder]:
    """Register a builder whose options are keyword-only, checking kwargs before calling it."""

    def deco(fn: Builder) -> Builder:
        @functools.wraps(fn)
        def builder(input_shape: tuple, num_classes: int, **kwargs: Any) -> nn.Module:
            check_kwargs("architecture", name, fn, kwargs)
            input_shape = tuple(int(s) for s in input_shape)
            if not isinstance(num_classes, int) or num_classes < 1:
                raise AttarError(f"architecture {name!r}: num_classes must be a positive integer, got {num_classes!r}.")
            return fn(input_shape, num_classes, **kwargs)

        ARCHS.register(name)(builder)
        return builder

    return deco


def _pos_int(arch: str, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise AttarError(f"architecture {arch!r}: {key} must be a positive integer, got {v!r}.")
    return v


def _image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise AttarError(
            f"architecture {arch!r} needs image inputs (C, H, W) but the data has shape {input_shape}; "
            "use arch: mlp for flat features."
        )
    return input_shape  # type: ignore[return-value]


# ---------------------------------------------------------------- mlp


class MLP(nn.Module):
    head_name = "classifier"

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        d = in_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)
        self.stage_names = [f"body.{2 * i + 1}" for i in range(len(hidden))]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.flatten(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@_register("mlp")
def mlp(input_shape: tuple, num_classes: int, *, hidden: list[int] | tuple[int, ...] = (128,)) -> nn.Module:
    """Flatten -> [Linear -> ReLU] per ``hidden`` width -> Linear. ``hidden: []`` is logistic regression."""
    if isinstance(hidden, int):
        hidden = [hidden]
    hidden = [_pos_int("mlp", "hidden[]", h) for h in hidden]
    return MLP(math.prod(input_shape), hidden, num_classes)


# ---------------------------------------------------------------- convnet

_NORMS = ("instancenorm", "batchnorm", "none")


class ConvNet(nn.Module):
    """The ConvNet of the dataset-distillation literature (DC, DSA, DM, MTT, ...).

    ``depth`` blocks of conv3x3(width) - norm - ReLU - AvgPool2d(2), then a Linear
    ``classifier``. As in the reference code, the first conv pads by 3 on
    single-channel inputs (28x28 MNIST becomes 32x32, so depth 3 ends at 4x4).
    Pooling is skipped (Identity) once the map is smaller than 2x2, so deep nets
    still run on 8x8 inputs with batchnorm or no norm; instance norm on a 1x1 map
    would erase the input, so that depth is refused.
    """

    head_name = "classifier"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int, depth: int, norm: str):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for d in range(depth):
            pad = 3 if (c == 1 and d == 0) else 1
            layers.append(nn.Conv2d(c if d == 0 else width, width, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if norm == "instancenorm" and h * w == 1:
                raise AttarError(
                    f"architecture 'convnet': depth {depth} is too deep for {input_shape[1]}x{input_shape[2]} inputs: "
                    f"block {d + 1} sees a 1x1 map, where instance norm erases the input (every image would give the "
                    f"same output). Use depth <= {d}, or norm: batchnorm / none."
                )
            if norm == "instancenorm":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm2d(width))
            else:
                layers.append(nn.Identity())
            layers.append(nn.ReLU())
            if min(h, w) >= 2:
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
            else:
                layers.append(nn.Identity())
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.feature_shape = (width, h, w)
        self.classifier = nn.Linear(width * h * w, num_classes)
        self.stage_names = [f"features.{4 * i + 3}" for i in range(depth)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@_register("convnet")
def convnet(input_shape: tuple, num_classes: int, *, width: int = 128, depth: int = 3, norm: str = "instancenorm") -> nn.Module:
    """Dataset-distillation ConvNet; ``norm`` is instancenorm (GroupNorm with one group per channel), batchnorm or none."""
    shape = _image_shape("convnet", input_shape)
    if norm not in _NORMS:
        raise AttarError(f"architecture 'convnet': norm must be one of {', '.join(_NORMS)}, got {norm!r}.")
    return ConvNet(shape, num_classes, _pos_int("convnet", "width", width), _pos_int("convnet", "depth", depth), norm)


# ---------------------------------------------------------------- resnet


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            # Projection shortcut (1x1 conv + BN, "option B"): simple and state-dict friendly.
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): 3 stages of n BasicBlocks, widths w, 2w, 4w."""

    head_name = "fc"
    stage_names = ["layer1", "layer2", "layer3"]

    def __init__(self, in_channels: int, num_classes: int, n: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        cin = width
        for s, (cout, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2)], start=1):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{s}", nn.Sequential(*blocks))
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.flatten(self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@_register("resnet")
def resnet(input_shape: tuple, num_classes: int, *, depth: int = 20, width: int = 16) -> nn.Module:
    """ResNet-``depth`` for small images; ``depth`` = 6n+2 (8, 14, 20, 32, ...), ``width`` = first-stage channels."""
    c, _, _ = _image_shape("resnet", input_shape)
    depth = _pos_int("resnet", "depth", depth)
    if depth < 8 or (depth - 2) % 6:
        raise AttarError(f"architecture 'resnet': depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}.")
    return ResNet(c, num_classes, (depth - 2) // 6, _pos_int("resnet", "width", width))
