"""Batch augmentations as plain tensor functions (no torchvision).

Each takes a whole batch and an explicit ``torch.Generator``: the randomness is a
function of the generator's state alone, so a run resumed from a checkpoint (which
saves that state) augments exactly as the uninterrupted run would have. Random draws
are made on the generator's device and moved to the batch's, so a CPU generator
drives GPU batches identically.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from attar.errors import AttarError
from attar.registry import Registry

AugmentFn = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _need_images(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise AttarError(f"{what} works on image batches [N, C, H, W]; got a tensor of shape {tuple(x.shape)}")


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with ``mean``/``std`` broadcast per sample ([C, 1, 1] or [D])."""
    return (x - mean.to(x.device, x.dtype)) / std.to(x.device, x.dtype)


def crop_offsets(n: int, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample (dy, dx) offsets in ``[0, 2 * padding]`` as a [2, N] int64 tensor."""
    return torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=generator.device)


def crop_at(x: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` then crop each sample back to size at its (dy, dx) offset.

    Output pixel (i, j) of sample k is padded[k, :, i + dy_k, j + dx_k], i.e. the
    image shifted by (padding - dy_k, padding - dx_k) with zeros shifted in. Two
    ``gather`` calls over index grids: no Python loop over samples.
    """
    _need_images(x, "crop")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    offsets = offsets.to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # [N, W]
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels (the classic pad-and-crop augmentation)."""
    _need_images(x, "random_crop")
    if padding < 0:
        raise AttarError(f"random_crop padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    return crop_at(x, padding, crop_offsets(x.shape[0], padding, generator))


def hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p`` (one draw per sample)."""
    _need_images(x, "hflip")
    if not 0.0 <= p <= 1.0:
        raise AttarError(f"hflip probability must be in [0, 1], got {p}")
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def default_crop_padding(size: int) -> int:
    """2 px for 28 px images, 4 for 32 px, 1 for tiny 8 px digits; about 1/8 of larger images."""
    return max(1, size // 8) if size >= 32 else max(1, size // 14)


# --- named augmentations, so a recipe can say augment: [crop, flip] --------------------------

AUGMENTS: Registry[Callable[[str | None], AugmentFn]] = Registry("augmentation")


def _number(name: str, arg: str, kind: type) -> float | int:
    try:
        return kind(arg)
    except ValueError:
        raise AttarError(f"augmentation {name!r}: cannot read {arg!r} as {kind.__name__} (e.g. crop:4, flip:0.5)") from None


@AUGMENTS.register("crop")
def _crop(arg: str | None) -> AugmentFn:
    """``crop`` pads by ``default_crop_padding(height)``; ``crop:N`` pads N pixels."""
    pad = None if arg is None else _number("crop", arg, int)
    if pad is not None and pad < 0:
        raise AttarError(f"augmentation 'crop:{arg}': padding must be >= 0")

    def crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _need_images(x, "augmentation 'crop'")
        return random_crop(x, default_crop_padding(x.shape[-2]) if pad is None else pad, generator)

    return crop


@AUGMENTS.register("flip")
def _flip(arg: str | None) -> AugmentFn:
    """``flip`` mirrors half the batch; ``flip:P`` with probability P."""
    p = 0.5 if arg is None else float(_number("flip", arg, float))
    if not 0.0 <= p <= 1.0:
        raise AttarError(f"augmentation 'flip:{arg}': probability must be in [0, 1]")
    return lambda x, generator: hflip(x, generator, p)


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], g: torch.Generator, flip: bool = True,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Differentiable RandomResizedCrop (+ horizontal flip) with its own draw per image: area share uniform in
    ``scale``, aspect ratio log-uniform in ``ratio`` (sides clipped to the image), position uniform, resized back
    to the input size by bilinear sampling (``affine_grid``)."""
    n = x.shape[0]
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=g)
    r = logr.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=g) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=g) - 1)
    sx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sx, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@AUGMENTS.register("rrc")
def _rrc(arg: str | None) -> AugmentFn:
    """``rrc`` random-resized-crops each image (area share in [0.08, 1], resized back); ``rrc:S`` from share S. The
    decoupled condensation methods' students train on such crops (SRe²L, RDED: with per-crop teacher labels)."""
    low = 0.08 if arg is None else float(_number("rrc", arg, float))
    if not 0.0 < low <= 1.0:
        raise AttarError(f"augmentation 'rrc:{arg}': the smallest area share must be in (0, 1]")

    def rrc(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _need_images(x, "augmentation 'rrc'")
        return random_resized_crop(x, (low, 1.0), generator, flip=False)

    return rrc


class Augment:
    """A fixed sequence of named augmentations, applied in order with one generator.

    Built from strings (``["crop", "flip"]`` or ``"crop:4,flip"``) so it can live in a
    recipe and a checkpoint as plain data; ``names`` gives that data back.
    """

    def __init__(self, names: Sequence[str] | str | None = None):
        if names is None:
            names = []
        if isinstance(names, str):
            names = [n for n in names.split(",")]
        self.names = [n.strip() for n in names if n.strip() and n.strip() != "none"]
        self._ops: list[AugmentFn] = []
        for entry in self.names:
            key, _, arg = entry.partition(":")
            self._ops.append(AUGMENTS.get(key.strip())(arg.strip() or None))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for op in self._ops:
            x = op(x, generator)
        return x

    def __bool__(self) -> bool:
        return bool(self._ops)

    def __repr__(self) -> str:
        return f"Augment({self.names!r})"


def make_augment(names: Sequence[str] | str | None) -> Augment:
    """``make_augment(["crop", "flip"])`` -> callable ``(x, generator) -> x``; unknown names list the known ones."""
    return Augment(names)
