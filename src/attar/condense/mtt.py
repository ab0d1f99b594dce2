"""``mtt``: Matching Training Trajectories (Cazenavette et al., CVPR 2022), with TESLA's constant-memory
gradient and DATM's difficulty-aligned windows and learnable soft labels.

An :mod:`expert store <attar.condense.experts>` holds ``K`` networks trained on the real data,
their parameters saved every epoch. Each outer iteration picks an expert ``k`` and a start epoch
``t`` (uniform in ``[min_start_epoch, max_start_epoch)``, as the reference code), starts a student
at the expert's ``θ*_t`` and trains it ``N = syn_steps`` plain SGD steps on mini-batches of the
synthetic set with a *learnable* learning rate ``α``::

    θ_{i+1} = θ_i − α ∇_θ ℓ(θ_i; A_i(X_{b_i}), Y_{b_i})           (A_i: a DSA draw, b_i: a batch)

and minimises the normalised parameter distance to the expert ``M = expert_epochs`` epochs later::

    L = ‖θ_N − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²

with respect to the images ``X`` (SGD, ``lr_img``, momentum 0.5), ``α`` (SGD, ``lr_lr``,
momentum 0.5, kept positive) and, with ``soft_labels``, the label logits ``Y``. The student runs
on one flat parameter vector through ``torch.func.functional_call`` (the reference code's trick).

Two ways to get ``∂L/∂(X, α, Y)``, equal up to rounding (tested in float64):

* ``constant_memory: false`` — autograd through the unrolled N steps (``create_graph=True``); the
  graph of all N forward/backward passes is alive at once, so memory grows linearly with N.
* ``constant_memory: true`` (TESLA's idea, done exactly) — a forward pass without a graph that
  keeps only the iterates ``θ_0 … θ_{N−1}`` (N flat vectors of P floats, e.g. 0.1 MB each for
  ConvNet-32 on 28×28 inputs), then reverse-mode accumulation step by step: with
  ``v_N = ∂L/∂θ_N`` and, for ``i = N−1 … 0``, re-doing step ``i``'s forward at the stored ``θ_i``
  with the *same* batch and augmentation,

      ∂L/∂X += −α ∂(g_iᵀ v_{i+1})/∂X,   ∂L/∂α += −g_iᵀ v_{i+1},   v_i = v_{i+1} − α H_i v_{i+1},

  where ``g_i = ∇_θ ℓ_i(θ_i)`` and ``H_i v`` is a Hessian-vector product (one double backward of
  the single step). Only one step's graph exists at a time, so the activation memory does not grow
  with N; the price is re-doing each step's forward and first backward (measured *faster* than the
  unrolled graph on CPU all the same, see docs/benchmarks.md).

DATM: ``max_start_epoch_final`` grows the upper end of the start window linearly from
``max_start_epoch`` (iteration 0) to ``max_start_epoch_final`` (at ``window_grow_iterations``,
default all iterations): early, easy trajectory segments first, later ones as the set learns.
``soft_labels`` learns per-image logits ``Y`` (initialised from an expert's logits on the initial
images: expert 0 at the end of the start window), used as soft targets ``softmax(Y)`` in the
student's cross-entropy; they are stored as the artifact's soft labels.

Plug-ins from :class:`~attar.condense.base.CondenseContext`: ``init`` (real samples or noise),
``flip`` (FYI: every student step sees each batch image and its horizontal flip) and ZCA (the
whole method, experts included, runs in ZCA space).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from attar.condense.augment import DSA, DSAParams
from attar.condense.base import CondenseContext, CondenseOutput, Condenser, Params, gen, register, standardise
from attar.condense.experts import ExpertConfig, check_store, default_store_dir, identity, open_store, store_identity
from attar.errors import AttarError


class FlatNet:
    """``fnet(flat, x)``: the module evaluated with its parameters taken from one flat vector."""

    def __init__(self, model: torch.nn.Module, names: list[str], shapes: list[list[int]]):
        self.model = model
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        own = [n for n, _ in model.named_parameters()]
        if own != self.names:
            raise AttarError(f"the network's parameters {own[:3]}… do not match the expert store's {self.names[:3]}…; "
                             "the store was built for another architecture.")

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        parts = flat.split(self.numels)
        return functional_call(self.model, {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}, (x,))


def normalised_distance(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖θ − θ*_{t+M}‖² / ‖θ*_t − θ*_{t+M}‖²`` (MTT's loss)."""
    return (theta - target).square().sum() / (start - target).square().sum()


def inner_loss(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with hard labels (int) or soft targets (logits: ``softmax`` of them)."""
    if yb.dtype in (torch.int64, torch.int32):
        return F.cross_entropy(out, yb)
    return F.cross_entropy(out, yb.softmax(-1))


@dataclass
class Step:
    rows: torch.Tensor
    aug: DSAParams | None


def plan_steps(n_syn: int, batch_syn: int | None, steps: int, g: torch.Generator, dsa: DSA | None,
               image_shape: tuple[int, ...], flip: bool) -> list[Step]:
    """The batches (as the reference: chunks of a random permutation, a new one when used up) and per-sample
    DSA draws of one outer iteration, drawn up front so the constant-memory pass can replay them exactly."""
    b = batch_syn or n_syn
    chunks: list[torch.Tensor] = []
    plan = []
    for _ in range(steps):
        if not chunks:
            chunks = list(torch.randperm(n_syn, generator=g).split(b))
        rows = chunks.pop()
        n = len(rows) * (2 if flip else 1)
        plan.append(Step(rows, dsa.sample(n, g, image_shape) if dsa is not None else None))
    return plan


def make_batch_fn(plan: list[Step], from_z: Callable[[torch.Tensor], torch.Tensor], y_hard: torch.Tensor,
                  dsa: DSA | None, flip: bool):
    """``batch(i, z, Y) -> (x_b, y_b)``: step ``i``'s images (augmented; with their flips under FYI) and targets."""

    def batch(i: int, z: torch.Tensor, soft: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        st = plan[i]
        rows = st.rows.to(z.device)
        xb = from_z(z[rows])
        yb = soft[rows] if soft is not None else y_hard[rows]
        if flip:
            xb = torch.cat([xb, xb.flip(-1)])
            yb = torch.cat([yb, yb])
        if st.aug is not None:
            xb = dsa.apply(xb, st.aug)
        return xb, yb

    return batch


@dataclass
class TrajGrads:
    loss: float
    z: torch.Tensor
    lr: torch.Tensor
    soft: torch.Tensor | None


def trajectory_grads(fnet: FlatNet, start: torch.Tensor, target: torch.Tensor, z: torch.Tensor,
                     soft: torch.Tensor | None, lr: torch.Tensor, batch: Callable, steps: int,
                     constant_memory: bool) -> TrajGrads:
    """The matching loss of one segment and its gradients with respect to the images ``z``, the learning rate
    ``lr`` and the soft-label logits ``soft`` (None: hard labels); see the module doc for the two modes."""
    start, target = start.detach(), target.detach()
    if not constant_memory:
        zl = z.detach().requires_grad_(True)
        sl = soft.detach().requires_grad_(True) if soft is not None else None
        lrl = lr.detach().clone().requires_grad_(True)
        theta = start.clone().requires_grad_(True)
        for i in range(steps):
            xb, yb = batch(i, zl, sl)
            (g,) = torch.autograd.grad(inner_loss(fnet(theta, xb), yb), theta, create_graph=True)
            theta = theta - lrl * g
        loss = normalised_distance(theta, start, target)
        wrt = [zl, lrl] + ([sl] if sl is not None else [])
        grads = torch.autograd.grad(loss, wrt)
        return TrajGrads(float(loss.detach()), grads[0], grads[1], grads[2] if sl is not None else None)

    a = lr.detach()
    zd = z.detach()
    sd = soft.detach() if soft is not None else None
    thetas: list[torch.Tensor] = []
    theta = start.clone()
    for i in range(steps):  # forward: no graph kept across steps, only the iterates
        thetas.append(theta)
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            xb, yb = batch(i, zd, sd)
            (g,) = torch.autograd.grad(inner_loss(fnet(th, xb), yb), th)
        theta = theta - a * g
    denom = (start - target).square().sum()
    loss = (theta - target).square().sum() / denom
    v = 2 * (theta - target) / denom  # dL/dθ_N
    gz = torch.zeros_like(zd)
    gs = torch.zeros_like(sd) if sd is not None else None
    glr = torch.zeros_like(a)
    for i in reversed(range(steps)):  # reverse: one step's graph at a time
        th = thetas[i].clone().requires_grad_(True)
        zl = zd.clone().requires_grad_(True)
        sl = sd.clone().requires_grad_(True) if sd is not None else None
        with torch.enable_grad():
            xb, yb = batch(i, zl, sl)
            (g,) = torch.autograd.grad(inner_loss(fnet(th, xb), yb), th, create_graph=True)
            dot = (g * v).sum()
            wrt = [th, zl] + ([sl] if sl is not None else [])
            out = torch.autograd.grad(dot, wrt, allow_unused=True)
        hv, dz = out[0], out[1]
        glr = glr - dot.detach()
        if dz is not None:
            gz -= a * dz
        if sl is not None and out[2] is not None:
            gs -= a * out[2]
        v = v - a * (hv if hv is not None else torch.zeros_like(v))
        thetas[i] = None  # type: ignore[call-overload]  # free as we go
    return TrajGrads(float(loss), gz, glr, gs)


class MTTParams(Params):
    # --- the expert store
    expert_dir: str | None = Field(None, description="expert-trajectory store folder (reused when its metadata matches, "
                                                      "built there otherwise); default $ATTAR_HOME/cache/experts-<hash>")
    num_experts: int = Field(5, ge=1, description="K experts (the reference code trains 100)")
    expert_train_epochs: int = Field(20, ge=1, description="epochs of each expert; parameters are saved after every epoch")
    expert_lr: float = Field(0.01, gt=0, description="experts' SGD learning rate (no momentum, no weight decay)")
    expert_batch: int = Field(256, ge=1)
    expert_dsa: bool = Field(True, description="per-sample DSA while training the experts")
    expert_seed: int = Field(0, description="seed of the experts (independent of the condensation seed)")
    # --- trajectory matching
    syn_steps: int = Field(20, ge=1, description="N: student steps on the synthetic set per iteration")
    expert_epochs: int = Field(2, ge=1, description="M: expert epochs the N student steps must cover")
    min_start_epoch: int = Field(0, ge=0, description="start epoch t drawn from [min_start_epoch, max_start_epoch)")
    max_start_epoch: int = Field(10, ge=1)
    max_start_epoch_final: int | None = Field(None, ge=1, description="DATM: grow the window's upper end linearly "
                                                                        "to this value over window_grow_iterations")
    window_grow_iterations: int | None = Field(None, ge=1, description="default: all iterations")
    lr_img: float = Field(1000.0, gt=0, description="SGD lr of the images (standardised pixel units; reference: 1000 at "
                                                   "CIFAR-10 IPC 10, 100 at IPC 50)")
    momentum: float = Field(0.5, ge=0, lt=1)
    syn_lr: float = Field(0.01, gt=0, description="initial student learning rate α (the experts' lr in the reference)")
    learn_lr: bool = Field(True, description="learn α")
    lr_lr: float = Field(1e-5, ge=0, description="SGD lr of α (reference: 1e-5 at IPC 10, 1e-7 at IPC 1)")
    batch_syn: int | None = Field(None, ge=1, description="synthetic rows per student step (default: all)")
    dsa: bool = Field(True, description="per-sample DSA in the student steps (replayed exactly under constant_memory)")
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    constant_memory: bool = Field(False, description="TESLA: exact gradient with activation memory independent of syn_steps")
    soft_labels: bool = Field(False, description="DATM: learn per-image label logits, initialised from an expert")
    lr_y: float = Field(2.0, gt=0, description="SGD lr of the soft-label logits (momentum 0.9)")

    @model_validator(mode="after")
    def _window(self):
        top = max(self.max_start_epoch, self.max_start_epoch_final or 0)
        if self.min_start_epoch >= self.max_start_epoch:
            raise ValueError(f"min_start_epoch ({self.min_start_epoch}) must be < max_start_epoch ({self.max_start_epoch}); "
                             "start epochs are drawn from [min_start_epoch, max_start_epoch)")
        if self.max_start_epoch_final is not None and self.max_start_epoch_final < self.max_start_epoch:
            raise ValueError("max_start_epoch_final must be >= max_start_epoch (the DATM window only grows)")
        if top - 1 + self.expert_epochs > self.expert_train_epochs:
            raise ValueError(
                f"the latest start epoch ({top - 1}) + expert_epochs ({self.expert_epochs}) exceeds expert_train_epochs "
                f"({self.expert_train_epochs}); lower max_start_epoch(_final)/expert_epochs or train longer experts")
        return self

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(self.num_experts, self.expert_train_epochs, self.expert_lr, self.expert_batch,
                            self.expert_dsa, self.expert_seed)


@register("mtt")
class MTT(Condenser):
    summary = "trajectory matching (MTT) with TESLA constant memory, DATM windows and soft labels"
    learns_images = True
    default_iterations = 5000
    Params = MTTParams

    def store_dir(self, ident: dict) -> str:
        return self.p.expert_dir or str(default_store_dir(ident, self.p.expert_config()))

    def preflight(self, *, model, data_name: str, data_hash: str, input_shape, num_classes: int,
                  zca_eps: float | None) -> None:
        """Refuse a mismatched expert store before any work (called by :func:`attar.condense.condense`)."""
        ident = identity(model, data_name, data_hash, input_shape, num_classes, zca_eps)
        check_store(self.store_dir(ident), ident, self.p.expert_config())

    def window(self, it: int, iterations: int) -> tuple[int, int]:
        """``[lo, hi)`` of the start epoch at iteration ``it`` (DATM: ``hi`` grows linearly)."""
        p = self.p
        hi = p.max_start_epoch
        if p.max_start_epoch_final is not None:
            span = p.window_grow_iterations or max(1, iterations - 1)
            hi = p.max_start_epoch + round((p.max_start_epoch_final - p.max_start_epoch) * min(1.0, it / span))
        return p.min_start_epoch, hi

    def run(self, ctx: CondenseContext, log: Callable[[str], None] | None = None) -> CondenseOutput:
        p = self.p
        cfg = p.expert_config()
        ident = store_identity(ctx)
        folder = self.store_dir(ident)
        store = open_store(folder, ctx, cfg, log)  # checks the metadata first; trains only what is missing
        to_z, from_z = standardise(ctx)
        z = to_z(ctx.init_images(gen(ctx.seed, "init"))).detach()
        y_hard = ctx.labels().to(ctx.device)
        net = ctx.fresh_model(self.name, "template")
        net.train()
        for q in net.parameters():
            q.requires_grad_(False)
        fnet = FlatNet(net, store.param_names, store.param_shapes)
        dtype = z.dtype
        soft = None
        if p.soft_labels:
            e = min(store.epochs, self.window(ctx.iterations, ctx.iterations)[1])
            with torch.no_grad():
                soft = fnet(store.trajectory(0)[e].to(ctx.device, dtype), from_z(z)).detach().clone()
        z.requires_grad_(True)
        lr = torch.tensor(p.syn_lr, dtype=dtype, device=ctx.device, requires_grad=True)
        opt_img = torch.optim.SGD([z], lr=p.lr_img, momentum=p.momentum)
        opt_lr = torch.optim.SGD([lr], lr=p.lr_lr, momentum=0.5)
        opt_y = None
        if soft is not None:
            soft.requires_grad_(True)
            opt_y = torch.optim.SGD([soft], lr=p.lr_y, momentum=0.9)
        dsa = DSA(p.dsa_strategy, mean=ctx.mean, std=ctx.std) if p.dsa and z.dim() == 4 else None
        first = last = None
        for it in range(ctx.iterations):
            if not ctx.keep_going(it):
                break
            g = gen(ctx.seed, self.name, it)
            k = int(torch.randint(min(store.num_experts, cfg.num_experts), (1,), generator=g))
            lo, hi = self.window(it, ctx.iterations)
            t = int(torch.randint(lo, hi, (1,), generator=g))
            traj = store.trajectory(k)
            start = traj[t].to(ctx.device, dtype)
            target = traj[t + p.expert_epochs].to(ctx.device, dtype)
            plan = plan_steps(len(z), p.batch_syn, p.syn_steps, g, dsa, tuple(z.shape[1:]), ctx.flip)
            batch = make_batch_fn(plan, from_z, y_hard, dsa, ctx.flip)
            r = trajectory_grads(fnet, start, target, z, soft, lr, batch, p.syn_steps, p.constant_memory)
            if not torch.isfinite(torch.tensor(r.loss)):
                raise AttarError(f"mtt: the matching loss became {r.loss} at iteration {it}; lower lr_img or lr_lr, "
                                 f"or syn_lr (now {float(lr):.4g}).")
            z.grad = r.z
            opt_img.step()
            if p.learn_lr and p.lr_lr > 0:
                lr.grad = r.lr.reshape(lr.shape)
                opt_lr.step()
                with torch.no_grad():
                    lr.clamp_(min=1e-6)
            if opt_y is not None:
                soft.grad = r.soft
                opt_y.step()
            first = r.loss if first is None else first
            last = r.loss
            ctx.step(it, loss=r.loss, syn_lr=float(lr.detach()), start_epoch=float(t))
        meta = {"mtt": {"expert_store": str(folder), "experts_trained_now": store.trained, "syn_lr": float(lr.detach()),
                        "first_loss": first, "last_loss": last, "num_experts": min(store.num_experts, cfg.num_experts),
                        "expert_epochs_in_store": store.epochs}}
        return CondenseOutput(from_z(z).detach().cpu(), ctx.labels(), soft=soft.detach().cpu() if soft is not None else None,
                              extra={"meta": meta})
