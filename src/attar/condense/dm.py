"""``dm``: Distribution Matching (Zhao & Bilen, WACV 2023).

Each iteration draws a freshly initialised network ψ (no training) and, for every class c at once,
minimises ``‖mean_b ψ(A(x_real[c, b])) − mean_i ψ(A(x_syn[c, i]))‖²`` summed over classes, where
``A`` is a DSA transform drawn per class and shared by that class's real and synthetic rows
(siamese). All classes go through the network in one batch; the per-class means are a
``view(C, -1, D).mean(1)``: no Python loop over classes.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from attar.condense.augment import DSA
from attar.condense.base import CondenseContext, CondenseOutput, Condenser, Params, embed_fn, gen, register, standardise
from attar.condense.chunking import cpu_rows, forward_rows


def class_means(embed: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_classes: int,
                rows: int | None = None) -> torch.Tensor:
    """``[C, D]`` mean embedding of class-major rows ``x`` (``C * k`` rows, ``k`` per class); ``rows``: embed
    that many rows per call (see :mod:`attar.condense.chunking`), ``None`` = all at once."""
    e = forward_rows(embed, x, rows)
    return e.reshape(num_classes, -1, e.shape[-1]).mean(1)


def dm_loss(embed: Callable[[torch.Tensor], torch.Tensor], x_real: torch.Tensor, x_syn: torch.Tensor,
            num_classes: int, rows: int | None = None) -> torch.Tensor:
    """Sum over classes of the squared distance between real and synthetic mean embeddings (class-major rows).
    Both sides are embedded ``rows`` rows at a time when given (same values, faster on CPU)."""
    with torch.no_grad():
        mr = class_means(embed, x_real, num_classes, rows)
    ms = class_means(embed, x_syn, num_classes, rows)
    return (mr - ms).square().sum()


def siamese(dsa: DSA | None, x_real: torch.Tensor, x_syn: torch.Tensor, num_classes: int,
            g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One DSA draw per class, applied identically to that class's real and synthetic rows (class-major)."""
    if dsa is None:
        return x_real, x_syn
    p = dsa.sample(num_classes, g, x_real.shape[1:])
    ir = torch.arange(num_classes).repeat_interleave(x_real.shape[0] // num_classes)
    is_ = torch.arange(num_classes).repeat_interleave(x_syn.shape[0] // num_classes)
    return dsa.apply(x_real, p, ir), dsa.apply(x_syn, p, is_)


class MatchParams(Params):
    lr_img: float = Field(1.0, gt=0, description="SGD learning rate of the images, in standardised pixel units")
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_real: int = Field(256, ge=1, description="real images per class per iteration")
    dsa: bool = Field(True, description="differentiable siamese augmentation")
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"


@register("dm")
class DM(Condenser):
    summary = "distribution matching: per-class mean embeddings under fresh random ConvNets"
    learns_images = True
    default_iterations = 20000
    Params = MatchParams

    def loss(self, net, xr: torch.Tensor, xs: torch.Tensor, ctx: CondenseContext) -> torch.Tensor:
        return dm_loss(embed_fn(net), xr, xs, ctx.num_classes, rows=cpu_rows(net, ctx.device))

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        to_z, from_z = standardise(ctx)
        z = to_z(ctx.init_images(gen(ctx.seed, "init"))).detach().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=self.p.lr_img, momentum=self.p.momentum)
        dsa = DSA(self.p.dsa_strategy, mean=ctx.mean, std=ctx.std) if self.p.dsa else None
        for it in range(ctx.iterations):
            if not ctx.keep_going(it):
                break
            g = gen(ctx.seed, self.name, it)
            net = ctx.fresh_model(self.name, it)
            net.train()
            for q in net.parameters():
                q.requires_grad_(False)
            xr, _ = ctx.real_batch(self.p.batch_real, g)
            xs, _ = ctx.flip_aware(from_z(z))  # FYI plug-in: the images and their mirror images
            xr, xs = siamese(dsa, xr, xs, ctx.num_classes, g)
            loss = self.loss(net, xr, xs, ctx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctx.step(it, loss=float(loss.detach()) / ctx.num_classes)
        return CondenseOutput(from_z(z).detach().cpu(), ctx.labels())
