"""``dc``: Dataset Condensation with Gradient Matching (Zhao, Mopuri & Bilen, ICLR 2021).

For ``iterations`` outer iterations a freshly initialised network is trained alternately:
``outer_loop`` times, the synthetic images are updated so that, for every class, the gradient of
the classification loss on the synthetic rows matches the gradient on a real batch of that class
(layer-wise distance below), and between those updates the network takes ``inner_loop`` SGD steps
on the current synthetic set.

Per-class gradients are computed for all classes at once with ``torch.func.vmap(grad(...))`` over a
``[C, B, ...]`` batch (no Python loop over classes); the synthetic side keeps its graph, so the
matching loss differentiates through it to the images.

Layer-wise distance (``dis_metric='ours'``, as in the paper): each weight gradient is viewed as
``[out, fan_in]``; the distance is ``Σ_out (1 − cos(g_real[o], g_syn[o]))``; 1-D tensors (biases,
norm scales) are skipped. ``mse`` and ``cos`` (one cosine over all parameters) are the paper's
ablations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.condense.augment import DSA
from attar.condense.base import CondenseContext, CondenseOutput, Condenser, Params, gen, register, standardise
from attar.condense.chunking import backward_rows, cpu_rows, mean_loss_grads
from attar.condense.dm import siamese

# (outer_loop, inner_loop) of the reference implementation, by images per class.
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def default_loops(ipc: int) -> tuple[int, int]:
    key = max([k for k in LOOPS if k <= ipc] or [1])
    return LOOPS[key]


def match_distance(g_real: dict[str, torch.Tensor], g_syn: dict[str, torch.Tensor], metric: str = "ours") -> torch.Tensor:
    """Gradient-matching distance summed over classes; tensors are ``[C, *param_shape]``."""
    if metric == "ours":
        total = None
        for k, gr in g_real.items():
            if gr.dim() <= 2:  # [C, n]: a bias or a norm scale
                continue
            gs = g_syn[k]
            gr2, gs2 = gr.flatten(2), gs.flatten(2)  # [C, out, fan_in]
            cos = (gr2 * gs2).sum(-1) / (gr2.norm(dim=-1) * gs2.norm(dim=-1) + 1e-6)
            d = (1 - cos).sum()
            total = d if total is None else total + d
        if total is None:
            raise ValueError("no weight tensor with more than one dimension to match")
        return total
    if metric == "mse":
        return sum((g_real[k] - g_syn[k]).square().sum() for k in g_real)
    if metric == "cos":
        gr = torch.cat([g_real[k].flatten(1) for k in g_real], 1)
        gs = torch.cat([g_syn[k].flatten(1) for k in g_real], 1)
        return (1 - (gr * gs).sum(1) / (gr.norm(dim=1) * gs.norm(dim=1) + 1e-6)).sum()
    raise ValueError(f"unknown dis_metric {metric!r}")


def per_class_grads(net: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    num_classes: int, batching: str = "vmap", rows: int | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy of each class's rows: ``{name: [C, *shape]}`` (class-major ``x``).

    ``batching='vmap'`` computes every class in one ``vmap(grad)`` call; ``'loop'`` takes one
    functional gradient per class and stacks them (same values; on CPU it measured 2-3x faster,
    since vmap turns the convolutions' weight gradients into grouped convolutions). Either way
    the result keeps its graph to ``x`` when ``x`` requires grad. With ``'loop'`` and ``rows``, a class
    whose gradient needs no graph (the real side) is taken ``rows`` rows at a time and accumulated
    (:mod:`attar.condense.chunking`: same values up to float rounding, faster on CPU).
    """
    from torch.func import functional_call, grad, vmap

    if batching == "loop":
        names = list(params)
        k = x.shape[0] // num_classes
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        need_graph = x.requires_grad and torch.is_grad_enabled()
        for c in range(num_classes):
            p = {n: v.detach().requires_grad_(True) for n, v in params.items()}
            xc, yc = x[c * k:(c + 1) * k], y[c * k:(c + 1) * k]
            with torch.enable_grad():
                if need_graph:
                    loss = F.cross_entropy(functional_call(net, p, (xc,)), yc)
                    gs = torch.autograd.grad(loss, [p[n] for n in names], create_graph=True)
                else:
                    gs = mean_loss_grads(lambda a, b: F.cross_entropy(functional_call(net, p, (a,)), b), xc, yc,
                                         [p[n] for n in names], rows)
            for n, g in zip(names, gs):
                out[n].append(g)
        return {n: torch.stack(v) for n, v in out.items()}

    def loss(p, xc, yc):
        return F.cross_entropy(functional_call(net, p, (xc,)), yc)

    xc = x.reshape(num_classes, -1, *x.shape[1:])
    yc = y.reshape(num_classes, -1)
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, xc, yc)


class DCParams(Params):
    lr_img: float = Field(0.1, gt=0, description="SGD learning rate of the images, in standardised pixel units")
    momentum: float = Field(0.5, ge=0, lt=1)
    lr_net: float = Field(0.01, gt=0, description="SGD learning rate of the network's inner steps")
    batch_real: int = Field(256, ge=1, description="real images per class per matching step")
    batch_train: int = Field(256, ge=1, description="synthetic rows per inner training step")
    outer_loop: int | None = Field(None, ge=1, description="matching steps per network (default by ipc, as the paper)")
    inner_loop: int | None = Field(None, ge=0, description="network steps between matching steps (default by ipc)")
    dis_metric: str = Field("ours", pattern="^(ours|mse|cos)$")
    grad_batching: str = Field(
        "auto", pattern="^(auto|vmap|loop)$",
        description="per-class gradients: vmap (one batched call), loop (one call per class), auto = vmap on GPU, loop on CPU",
    )
    dsa: bool = Field(False, description="differentiable siamese augmentation (method 'dsa' turns it on)")
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"


@register("dc")
class DC(Condenser):
    summary = "gradient matching, layer-wise cosine distance (DC)"
    learns_images = True
    default_iterations = 1000
    Params = DCParams

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        p = self.p
        outer, inner = default_loops(ctx.ipc)
        outer = p.outer_loop or outer
        inner = inner if p.inner_loop is None else p.inner_loop
        to_z, from_z = standardise(ctx)
        z = to_z(ctx.init_images(gen(ctx.seed, "init"))).detach().requires_grad_(True)
        y_syn = ctx.labels().to(ctx.device)
        opt = torch.optim.SGD([z], lr=p.lr_img, momentum=p.momentum)
        dsa = DSA(p.dsa_strategy, mean=ctx.mean, std=ctx.std) if p.dsa else None
        c = ctx.num_classes
        y_real = torch.arange(c, device=ctx.device).repeat_interleave(p.batch_real)
        batching = p.grad_batching if p.grad_batching != "auto" else ("vmap" if ctx.device.type == "cuda" else "loop")
        for it in range(ctx.iterations):
            if not ctx.keep_going(it):
                break
            net = ctx.fresh_model(self.name, it)
            net.train()
            net_opt = torch.optim.SGD(net.parameters(), lr=p.lr_net)
            chunk = cpu_rows(net, ctx.device)  # rows per forward for the no-graph passes (CPU, no BatchNorm)
            total = 0.0
            for ol in range(outer):
                g = gen(ctx.seed, self.name, it, ol)
                params = {k: v.detach() for k, v in net.named_parameters()}
                xr, _ = ctx.real_batch(p.batch_real, g)
                xs, ys = ctx.flip_aware(from_z(z), y_syn)  # FYI plug-in: the images and their mirror images
                xr, xs = siamese(dsa, xr, xs, c, g)
                gr = {k: v.detach() for k, v in per_class_grads(net, params, xr.detach(), y_real, c, batching,
                                                                chunk).items()}
                gs = per_class_grads(net, params, xs, ys, c, batching)
                loss = match_distance(gr, gs, p.dis_metric)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                if ol == outer - 1:
                    break
                # Train the network on the current synthetic set (detached) for `inner` steps.
                xd = from_z(z).detach()
                for s in range(inner):
                    gi = gen(ctx.seed, self.name, it, ol, "inner", s)
                    rows = torch.randperm(len(xd), generator=gi)[: p.batch_train].to(ctx.device)
                    xb = xd[rows]
                    if dsa is not None:
                        xb = dsa.apply(xb, dsa.sample(len(xb), gi, xb.shape[1:]))
                    net_opt.zero_grad(set_to_none=True)
                    backward_rows(lambda a, b: F.cross_entropy(net(a), b), xb, y_syn[rows], chunk)
                    net_opt.step()
            ctx.step(it, loss=total / outer / c)
        return CondenseOutput(from_z(z).detach().cpu(), ctx.labels())
