"""``ncfm``: Neural Characteristic Function Matching (Wang et al., CVPR 2025): distribution matching as a min-max game
over the characteristic functions of real and synthetic features.

For a class, with L2-normalised features ``f`` of a feature network and frequencies ``t ∈ R^D``, the empirical
characteristic function is ``φ(t) = mean_i exp(i tᵀf_i)``. The discrepancy (NCFD) at ``t`` weighs the amplitude and
the phase differences of the real ``a = φ_real(t)`` and synthetic ``b = φ_syn(t)``::

    amp = (|a| − |b|)²,   pha = 2(|a||b| − Re(a b̄)) = |a − b|² − amp,   d(t) = sqrt(α·amp + β·pha)

averaged over the ``num_freqs`` frequencies, summed over classes and scaled by ``loss_scale`` (the reference's
300). Frequencies come from a **sampling network** (``sampler: net``; the reference SampleNet: three Linear +
BatchNorm layers, LeakyReLU(0.2), Tanh output, fed Gaussian noise) trained by gradient *ascent* on the same loss
(Adam ``lr_sampler``) while the images descend it (Adam ``lr_img``, standardised pixels): each iteration one
backward pass gives both gradients (:func:`minmax_step`). ``sampler: gaussian`` uses fresh ``t ~ N(0, I)``
instead (the reference configs' default). With α = β the discrepancy is ``sqrt(α)·|a − b|``.

Feature networks: a pool of ``feature_nets`` condensation networks trained ``feature_epochs`` epochs on the real
data (cached; one drawn per iteration), or fresh random networks each iteration (``feature_epochs: 0``, as DM).
Real and synthetic rows of a class share a DSA draw (siamese), all classes in one forward pass.

Calibration (the reference's ``iter_calib``/``calib_weight``; off by default): after each matching step,
``calib_iters`` more image steps on ``calib_weight · Σ_c CE(m(A(x_c)), c)``, a trained network ``m`` (``calib_model``,
else the pool's first network) classifying the augmented synthetic images of each class, so the images stay
recognisable to a trained classifier while their feature distribution is matched. One Adam step covers all classes
(the reference steps class by class). Not implemented: the reference's multi-image "factor" decoding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attar.condense.augment import DSA
from attar.condense.base import CondenseContext, CondenseOutput, Condenser, Params, embed_fn, gen, register, standardise
from attar.condense.dm import siamese
from attar.errors import AttarError


def char_fn(feats: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts ``[C, K]`` of the empirical characteristic functions of ``feats [C, n, D]`` at ``t [K, D]``."""
    ph = torch.einsum("kd,cnd->ckn", t, feats)
    return ph.cos().mean(-1), ph.sin().mean(-1)


def ncf_discrepancy(real: torch.Tensor, syn: torch.Tensor, t: torch.Tensor, alpha: float = 0.5, beta: float = 0.5,
                    eps: float = 1e-12) -> torch.Tensor:
    """Σ_classes mean_t sqrt(α·amp + β·pha) for class-grouped features ``real [C, n, D]``, ``syn [C, m, D]``
    (exactly 0 when the two sets are equal; ``sqrt(x + eps) − sqrt(eps)`` keeps the gradient finite there)."""
    ar, ai = char_fn(real, t)
    br, bi = char_fn(syn, t)
    amp = (torch.sqrt(ar ** 2 + ai ** 2 + eps) - torch.sqrt(br ** 2 + bi ** 2 + eps)) ** 2
    pha = ((ar - br) ** 2 + (ai - bi) ** 2 - amp).clamp_min(0)
    d = torch.sqrt(alpha * amp + beta * pha + eps) - eps ** 0.5
    return d.mean(-1).sum()


class SampleNet(nn.Module):
    """Maps Gaussian noise ``[K, D]`` to frequencies ``[K, D]`` in (−1, 1) (the NCFM reference's sampling network)."""

    def __init__(self, dim: int, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.LeakyReLU(0.2) if i < layers - 1 else nn.Tanh()]
        self.body = nn.Sequential(*mods)
        self.dim = dim

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.body(noise)

    def sample(self, k: int, g: torch.Generator, device) -> torch.Tensor:
        return self(torch.randn(k, self.dim, generator=g).to(device))


def minmax_step(loss: torch.Tensor, images: torch.Tensor, sampler: nn.Module | None,
                opt_img: torch.optim.Optimizer, opt_sampler: torch.optim.Optimizer | None) -> None:
    """One step of the game from one backward pass: the images descend ``loss``, the sampler ascends it."""
    params = [q for q in sampler.parameters() if q.requires_grad] if sampler is not None else []
    grads = torch.autograd.grad(loss, [images, *params])
    images.grad = grads[0]
    for q, gq in zip(params, grads[1:]):
        q.grad = -gq
    opt_img.step()
    if opt_sampler is not None:
        opt_sampler.step()


class NCFMParams(Params):
    lr_img: float = Field(0.01, gt=0, description="Adam learning rate of the images (standardised pixels)")
    lr_sampler: float = Field(1e-3, gt=0, description="Adam learning rate of the sampling network (ascent)")
    sampler: Literal["net", "gaussian"] = Field("net", description="net: learned sampling network (min-max); "
                                                "gaussian: t ~ N(0, I) each iteration")
    num_freqs: int = Field(4096, ge=1, description="frequencies t per iteration")
    alpha: float = Field(0.5, ge=0, description="weight of the amplitude difference")
    beta: float = Field(0.5, ge=0, description="weight of the phase difference")
    loss_scale: float = Field(300.0, gt=0)
    batch_real: int = Field(256, ge=1, description="real images per class per iteration")
    feature_nets: int = Field(5, ge=1, description="trained feature networks in the pool")
    feature_epochs: int = Field(2, ge=0, description="epochs each pool network trains (0: a fresh random net per iteration)")
    dsa: bool = Field(True, description="differentiable siamese augmentation")
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    calib_iters: int = Field(0, ge=0, description="calibration image steps after each matching step (0: off)")
    calib_weight: float = Field(1.0, ge=0, description="weight of the calibration cross-entropy")
    calib_model: str | None = Field(None, description="model artifact trained on the real data that calibrates "
                                    "(unset: the pool's first network)")


def calibration_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``Σ_c mean_{i in c} CE(net(x_i), c)``: each class's mean cross-entropy, summed (class-major, equal rows)."""
    return F.cross_entropy(net(x), y, reduction="sum") / (len(y) // num_classes)


@register("ncfm")
class NCFM(Condenser):
    summary = "characteristic-function matching, min-max: a sampling network picks frequencies that separate real and synthetic"
    learns_images = True
    default_iterations = 20000
    Params = NCFMParams

    def pool(self, ctx: CondenseContext) -> list[nn.Module]:
        from attar.condense.bn_matching import trained_net

        if self.p.feature_epochs == 0:
            return []
        return [trained_net(ctx, ctx.model, self.p.feature_epochs, seed=100 + k, need_bn=False, method=self.name)[0]
                for k in range(self.p.feature_nets)]

    def calibrator(self, ctx: CondenseContext, pool: list[nn.Module]) -> nn.Module | None:
        """The trained network of the calibration term (None when it is off)."""
        if self.p.calib_iters == 0:
            return None
        if self.p.calib_model is not None:
            from attar.models import load_model

            net, info = load_model(self.p.calib_model)
            if int(info["num_classes"]) != ctx.num_classes:
                raise AttarError(f"ncfm calib_model {self.p.calib_model} predicts {info['num_classes']} classes; the data "
                                 f"have {ctx.num_classes}.")
        elif pool:
            net = pool[0]
        else:
            raise AttarError("ncfm calib_iters needs a trained network: set calib_model, or feature_epochs > 0 so the "
                             "pool's first network calibrates.")
        net = net.to(ctx.device).eval()
        for q in net.parameters():
            q.requires_grad_(False)
        return net

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        p = self.p
        to_z, from_z = standardise(ctx)
        z = to_z(ctx.init_images(gen(ctx.seed, "init"))).detach().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=p.lr_img)
        dsa = DSA(p.dsa_strategy, mean=ctx.mean, std=ctx.std) if p.dsa else None
        pool = self.pool(ctx)
        for net in pool:
            for q in net.parameters():
                q.requires_grad_(False)
        calib = self.calibrator(ctx, pool)
        sampler = opt_s = None
        first = last = calib_last = None
        for it in range(ctx.iterations):
            if not ctx.keep_going(it):
                break
            g = gen(ctx.seed, self.name, it)
            net = pool[it % len(pool)] if pool else ctx.fresh_model(self.name, it)
            net.train()
            for q in net.parameters():
                q.requires_grad_(False)
            xr, _ = ctx.real_batch(p.batch_real, g)
            xs, _ = ctx.flip_aware(from_z(z))
            xr, xs = siamese(dsa, xr, xs, ctx.num_classes, g)
            embed = embed_fn(net)
            with torch.no_grad():
                fr = F.normalize(embed(xr).flatten(1), dim=1)
            fs = F.normalize(embed(xs).flatten(1), dim=1)
            d = fr.shape[1]
            if p.sampler == "net" and sampler is None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen(ctx.seed, self.name, "sampler"))))
                    sampler = SampleNet(d).to(ctx.device)
                opt_s = torch.optim.Adam(sampler.parameters(), lr=p.lr_sampler)
            t = sampler.sample(p.num_freqs, g, ctx.device) if sampler is not None else \
                torch.randn(p.num_freqs, d, generator=g).to(ctx.device)
            loss = p.loss_scale * ncf_discrepancy(fr.view(ctx.num_classes, -1, d), fs.view(ctx.num_classes, -1, d), t,
                                                  p.alpha, p.beta)
            opt.zero_grad(set_to_none=True)
            if opt_s is not None:
                opt_s.zero_grad(set_to_none=True)
            minmax_step(loss, z, sampler, opt, opt_s)
            for _ in range(p.calib_iters if calib is not None else 0):
                calib.eval()  # it may be the pool network just used for matching (train mode)
                xc, yc = ctx.flip_aware(from_z(z), ctx.labels().to(ctx.device))
                if dsa is not None:
                    draw = dsa.sample(ctx.num_classes, g, xc.shape[1:])
                    xc = dsa.apply(xc, draw, torch.arange(ctx.num_classes).repeat_interleave(len(xc) // ctx.num_classes))
                c_loss = p.calib_weight * calibration_loss(calib, xc, yc, ctx.num_classes)
                opt.zero_grad(set_to_none=True)
                c_loss.backward()
                opt.step()
                calib_last = float(c_loss.detach()) / ctx.num_classes
            value = float(loss.detach()) / ctx.num_classes
            first = value if first is None else first
            last = value
            ctx.step(it, loss=value)
        meta = {"ncfm": {"loss_first": first, "loss_last": last, "feature_nets": len(pool) or "random each iteration",
                         **({"calibration_loss_last": calib_last} if calib is not None else {})}}
        return CondenseOutput(from_z(z).detach().cpu(), ctx.labels(), extra={"meta": meta})
