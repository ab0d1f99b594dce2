"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021).

Every transform is differentiable with respect to the images (affine ones through
``affine_grid``/``grid_sample``, the rest are arithmetic and masks), and its random parameters
are drawn *separately* from applying it: :meth:`DSA.sample` returns a :class:`DSAParams`, and
:meth:`DSA.apply` applies it. "Siamese" means applying the same parameters to the real and the
synthetic batch, so gradient or distribution matching compares like with like:

    p = dsa.sample(n=1, generator=g)            # one transform for the whole batch
    xr, xs = dsa.apply(x_real, p), dsa.apply(x_syn, p)

``n`` parameter rows apply row-wise: ``n == 1`` broadcasts one transform over the batch; ``n == C``
with ``index`` (the class of each row) gives each class its own transform in one batched call;
``n == len(batch)`` is ordinary per-sample augmentation (how the evaluation nets train).

Transforms (as in the reference code; strengths are its defaults): ``color`` (brightness ±0.5,
saturation ×[0, 2], contrast ×[0.5, 1.5]; in standardised pixel units), ``crop`` (translation by
up to 1/8 of the size, zero padding), ``cutout`` (a zeroed square of half the size), ``flip``
(horizontal, p = 0.5), ``scale`` (×[1/1.2, 1.2] per axis), ``rotate`` (±15°). Mode ``single``
picks one of them per call (the reference's mode 'S'); ``all`` chains every one.

Images are transformed in standardised space ``(x - mean) / std`` (so "zero padding" is the mean
colour and colour strengths mean the same on every data set) and returned in the input's scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from attar.errors import AttarError

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass
class DSAParams:
    """Random parameters of one augmentation draw; every tensor has ``n`` rows (see module doc)."""

    ops: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return next(iter(self.values.values())).shape[0] if self.values else 1


class DSA:
    """``DSA(strategy="color_crop_cutout_flip_scale_rotate", mode="single", mean=..., std=...)``."""

    def __init__(
        self,
        strategy: str | Sequence[str] = "color_crop_cutout_flip_scale_rotate",
        mode: str = "single",
        mean: torch.Tensor | float = 0.0,
        std: torch.Tensor | float = 1.0,
        *,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        crop: float = 0.125,
        cutout: float = 0.5,
        flip: float = 0.5,
        scale: float = 1.2,
        rotate: float = 15.0,
    ):
        ops = [o for o in (strategy.split("_") if isinstance(strategy, str) else strategy) if o and o != "none"]
        bad = [o for o in ops if o not in OPS]
        if bad:
            raise AttarError(f"DSA strategy has unknown transform(s) {bad}; known: {', '.join(OPS)} (joined by '_').")
        if mode not in ("single", "all"):
            raise AttarError(f"DSA mode must be 'single' (one transform per call) or 'all', got {mode!r}.")
        self.ops = tuple(ops)
        self.mode = mode
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.k = dict(brightness=brightness, saturation=saturation, contrast=contrast, crop=crop, cutout=cutout,
                      flip=flip, scale=scale, rotate=rotate)

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: torch.Generator, shape: Sequence[int]) -> DSAParams:
        """Draw parameters for ``n`` rows; ``shape`` is the image shape ``(C, H, W)`` (for pixel sizes)."""
        if not self.ops:
            return DSAParams(ops=())
        g = generator

        def u(*size: int) -> torch.Tensor:
            return torch.rand(*size, generator=g, device=g.device).cpu()

        if self.mode == "single":
            ops = (self.ops[int(torch.randint(len(self.ops), (1,), generator=g, device=g.device))],)
        else:
            ops = self.ops
        _, h, w = (int(s) for s in shape[-3:])
        k = self.k
        v: dict[str, torch.Tensor] = {}
        for op in ops:
            if op == "color":
                v["brightness"] = (u(n) - 0.5) * k["brightness"]
                v["saturation"] = u(n) * k["saturation"]
                v["contrast"] = u(n) + k["contrast"]
            elif op == "crop":
                sh, sw = int(h * k["crop"] + 0.5), int(w * k["crop"] + 0.5)
                v["shift_y"] = torch.randint(-sh, sh + 1, (n,), generator=g, device=g.device).cpu().float()
                v["shift_x"] = torch.randint(-sw, sw + 1, (n,), generator=g, device=g.device).cpu().float()
            elif op == "cutout":
                v["cut_y"] = torch.randint(0, h + (1 - h % 2), (n,), generator=g, device=g.device).cpu().float()
                v["cut_x"] = torch.randint(0, w + (1 - w % 2), (n,), generator=g, device=g.device).cpu().float()
            elif op == "flip":
                v["flip"] = (u(n) < k["flip"]).float()
            elif op == "scale":
                lo, hi = 1.0 / k["scale"], k["scale"]
                v["scale_x"] = u(n) * (hi - lo) + lo
                v["scale_y"] = u(n) * (hi - lo) + lo
            elif op == "rotate":
                v["angle"] = (u(n) - 0.5) * 2 * k["rotate"] / 180 * math.pi
        return DSAParams(ops=ops, values=v)

    # ------------------------------------------------------------------ applying
    def apply(self, x: torch.Tensor, p: DSAParams, index: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``p`` to ``x`` [N, C, H, W]; row ``i`` uses parameter row ``index[i]`` (or ``i``, or ``0`` when ``p.n == 1``)."""
        if not p.ops:
            return x
        if x.dim() != 4:
            raise AttarError(f"DSA works on image batches [N, C, H, W]; got {tuple(x.shape)}.")
        n = x.shape[0]
        if index is None:
            if p.n not in (1, n):
                raise AttarError(f"DSA parameters have {p.n} rows for a batch of {n}; pass index= to map rows.")
            index = torch.zeros(n, dtype=torch.long) if p.n == 1 else torch.arange(n)
        vals = {k: t.to(x.device, x.dtype)[index.to(x.device)] for k, t in p.values.items()}
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        z = (x - mean) / std
        theta = None  # affine transforms are composed and sampled once
        for op in p.ops:
            if op == "color":
                z = z + vals["brightness"].view(-1, 1, 1, 1)
                m = z.mean(dim=1, keepdim=True)
                z = (z - m) * vals["saturation"].view(-1, 1, 1, 1) + m
                m = z.mean(dim=(1, 2, 3), keepdim=True)
                z = (z - m) * vals["contrast"].view(-1, 1, 1, 1) + m
            elif op == "cutout":
                z = z * _cutout_mask(z, vals["cut_y"], vals["cut_x"], self.k["cutout"])
            elif op == "flip":
                f = vals["flip"].view(-1, 1, 1, 1)
                z = f * z.flip(3) + (1 - f) * z
            else:
                theta = _compose(theta, _affine(op, vals, z.shape))
        if theta is not None:
            grid = F.affine_grid(theta, list(z.shape), align_corners=False)
            z = F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return z * std + mean

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Trainer-style augmentation ``(x, generator) -> x``: independent parameters per sample."""
        return self.apply(x, self.sample(x.shape[0], generator, x.shape[1:]))

    def __repr__(self) -> str:
        return f"DSA({'_'.join(self.ops)!r}, mode={self.mode!r})"


def _affine(op: str, v: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """[N, 2, 3] matrices mapping output to input coordinates in affine_grid's normalised space."""
    n, _, h, w = shape
    dev, dt = v[next(iter(v))].device, v[next(iter(v))].dtype
    t = torch.zeros(n, 2, 3, device=dev, dtype=dt)
    if op == "scale":
        t[:, 0, 0] = v["scale_x"]
        t[:, 1, 1] = v["scale_y"]
    elif op == "rotate":
        c, s = torch.cos(v["angle"]), torch.sin(v["angle"])
        t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1] = c, s, -s, c
    elif op == "crop":
        # Shift by whole pixels: with align_corners=False one pixel is 2/size in normalised coordinates,
        # so bilinear sampling lands exactly on pixel centres (a pure translation with zeros shifted in).
        t[:, 0, 0] = 1.0
        t[:, 1, 1] = 1.0
        t[:, 0, 2] = v["shift_x"] * 2.0 / w
        t[:, 1, 2] = v["shift_y"] * 2.0 / h
    return t


def _compose(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    if a is None:
        return b
    pad = torch.tensor([0.0, 0.0, 1.0], device=b.device, dtype=b.dtype).expand(b.shape[0], 1, 3)
    return (torch.cat([a, pad], 1) @ torch.cat([b, pad], 1))[:, :2]


def _cutout_mask(z: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, ratio: float) -> torch.Tensor:
    n, _, h, w = z.shape
    hh, hw = int(h * ratio + 0.5) // 2, int(w * ratio + 0.5) // 2
    rows = torch.arange(h, device=z.device, dtype=z.dtype)[None, :]
    cols = torch.arange(w, device=z.device, dtype=z.dtype)[None, :]
    inside_r = (rows >= (cy[:, None] - hh)) & (rows < (cy[:, None] + hh))
    inside_c = (cols >= (cx[:, None] - hw)) & (cols < (cx[:, None] + hw))
    hole = inside_r[:, :, None] & inside_c[:, None, :]
    return (~hole).to(z.dtype)[:, None]


def make_dsa(mean, std, strategy: str = "color_crop_cutout_flip_scale_rotate", mode: str = "single") -> DSA:
    return DSA(strategy, mode, mean=mean, std=std)
