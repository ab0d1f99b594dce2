"""What the decoupled ("squeeze, recover, relabel") condensers share: teachers, BatchNorm-statistic matching,
the crop curriculum and the recovery loop (used by ``sre2l``, ``cda`` and ``cvdd``).

* **Squeeze**: a teacher trained on the real data. Given as a model artifact, or trained here with the Trainer
  (:func:`trained_net`) and cached in ``$ATTAR_HOME/cache/condense-teacher-<hash>`` (keyed by the data hash, the
  architecture and the training settings), so reruns reuse it and ``condense evaluate`` can reload it for
  DD-Ranking's equal-label control.
* **Recover** (:func:`recover`): images start as noise (or real images) and minimise, for every committee member
  ``m`` with vote weight ``w_m``, ``Σ_m w_m [CE(m(A(x)), y) + r_bn · Σ_l k_l (‖μ_l(A(x)) − μ_l^BN‖₂ +
  ‖σ²_l(A(x)) − σ²_l^BN‖₂)]`` where μ_l, σ²_l are the batch mean and (biased) variance of the input of BatchNorm
  layer ``l`` (forward hooks; the running statistics are the targets; ``k_1 = first_bn_multiplier``, others 1:
  the reference code's form, norms not squared), and ``A`` is a random-resized crop + horizontal flip + roll
  jitter drawn anew each iteration. Adam (betas 0.5, 0.9) with a cosine learning rate; pixels are clipped to
  [0, 1] after every step. The crop's smallest area share comes from :func:`crop_min_scale` (constant for
  SRe²L, CDA's global-to-local curriculum).
* **Relabel**: the teacher's (committee's) logits on the final images are stored as soft labels (one vector per
  image, not per crop as SRe²L's FKD-style relabelling).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attar.condense.base import CondenseContext, gen, seed_of, standardise
from attar.data.transforms import random_resized_crop
from attar.errors import AttarError
from attar.specs import ModelSpec

#: bump when the cached teachers' training changes, so old ones are not reused
_TEACHER_VERSION = 1


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_stat_loss(mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """``‖μ − μ^BN‖₂ + ‖σ² − σ²^BN‖₂`` (SRe²L's R_BN term for one layer)."""
    return torch.linalg.vector_norm(mean - running_mean) + torch.linalg.vector_norm(var - running_var)


class BNStatHooks:
    """Forward hooks on every BatchNorm layer of ``model``; after a forward pass, :meth:`loss` is
    ``Σ_l k_l · bn_stat_loss(batch stats of layer l's input, its running stats)``."""

    def __init__(self, model: nn.Module, first_multiplier: float = 1.0):
        self.layers = bn_layers(model)
        self.first = first_multiplier
        self.terms: list[torch.Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def fn(module, inputs, output):
            x = inputs[0]
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            self.terms[i] = bn_stat_loss(mean, var, module.running_mean, module.running_var)
        return fn

    def loss(self) -> torch.Tensor:
        if any(t is None for t in self.terms):
            raise AttarError("BatchNorm hooks saw no forward pass; call the model first.")
        return sum(t * (self.first if i == 0 else 1.0) for i, t in enumerate(self.terms))  # type: ignore[operator]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def crop_min_scale(it: int, total: int, mode: str = "constant", milestone: float = 1.0, low: float = 0.08) -> float:
    """The random-resized crop's smallest area share at iteration ``it`` of ``total``.

    ``constant``: ``low`` throughout (SRe²L). CDA (global to local) until ``milestone · total``, then ``low``:
    ``step`` 1.0; ``linear`` ``low + (1 − low)(1 − it/M)``; ``cosine`` ``low + (1 − low)(1 + cos(π it/M))/2``
    with ``M = milestone · total`` (the CDA reference code's formulas)."""
    m = milestone * total
    if mode == "constant" or it >= m:
        return low
    if mode == "step":
        return 1.0
    if mode == "linear":
        return low + (1.0 - low) * (1.0 - it / m)
    if mode == "cosine":
        return low + (1.0 - low) * (1.0 + math.cos(math.pi * it / m)) / 2.0
    raise AttarError(f"crop curriculum must be constant, step, linear or cosine; got {mode!r}.")


def roll_jitter(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Roll the whole batch by a random ``(0..max_shift, 0..max_shift)`` pixel offset (the reference's jitter)."""
    if max_shift <= 0:
        return x
    a, b = (int(v) for v in torch.randint(0, max_shift + 1, (2,), generator=g))
    return torch.roll(x, shifts=(a, b), dims=(-2, -1))


class Committee(nn.Module):
    """Teachers voting with weights: ``forward`` gives ``log Σ_m w_m softmax(m(x))``, the log of the weighted
    mixture of their predictive distributions (with one member: its log-softmax)."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        if len(members) != len(weights) or not members:
            raise AttarError("a committee needs one weight per member and at least one member.")
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]) / float(sum(weights)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([F.log_softmax(m(x).float(), -1) for m in self.members])  # [M, N, C]
        return torch.logsumexp(logp + self.weights.to(logp).log()[:, None, None], 0)

    @classmethod
    def load(cls, paths: Sequence[str], weights: Sequence[float]) -> "Committee":
        from attar.models import load_model

        return cls([load_model(p)[0] for p in paths], weights)


def vote_weights(priors: Sequence[float], voter: str, temperature: float) -> list[float]:
    """CV-DD's voter: ``prior`` = softmax(prior / temperature) (priors in percent), ``equal`` = 1/M each."""
    if voter == "equal":
        return [1.0 / len(priors)] * len(priors)
    p = torch.tensor([float(v) for v in priors]) / temperature
    return torch.softmax(p, 0).tolist()


# --------------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------------


def bn_spec(model: ModelSpec) -> ModelSpec:
    """The condensation network with BatchNorm: a ConvNet gets ``norm: batchnorm``; other specs are kept."""
    if model.arch == "convnet":
        return model.model_copy(update={"args": {**model.args, "norm": "batchnorm"}})
    return model


def load_teacher(path: str, ctx: CondenseContext, method: str, need_bn: bool = True) -> nn.Module:
    from attar.models import load_model

    if not Path(path).exists():
        raise AttarError(f"{method} teacher {path} does not exist; give a model artifact folder, or leave teacher "
                         "unset to train one on the data.")
    model, info = load_model(path)
    if int(info["num_classes"]) != ctx.num_classes or tuple(info["input_shape"]) != ctx.input_shape:
        raise AttarError(f"{method} teacher {path} predicts {info['num_classes']} classes on inputs "
                         f"{tuple(info['input_shape'])}; the data have {ctx.num_classes} classes and inputs {ctx.input_shape}.")
    if need_bn and not bn_layers(model):
        raise AttarError(f"{method} matches the teacher's BatchNorm statistics, but teacher {path} has no BatchNorm "
                         "layers; train one with model {arch: convnet, args: {norm: batchnorm}} (or a resnet), or leave "
                         "teacher unset to train one.")
    return model.to(ctx.device).eval()


def _split(ctx: CondenseContext, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified ~10% holdout (at least one row per class) and the rest: (train rows, val rows)."""
    counts = ctx.index.counts
    k = max(1, int(counts.min()) // 10)
    val = ctx.index.draw(k, gen(seed, "teacher-holdout")).flatten().unique()
    keep = torch.ones(len(ctx.y), dtype=torch.bool)
    keep[val] = False
    keep &= ctx.y >= 0
    return keep.nonzero().flatten(), val


def trained_net(ctx: CondenseContext, spec: ModelSpec, epochs: int, seed: int, *, lr: float = 0.01,
                batch_size: int = 256, need_bn: bool = True, method: str = "") -> tuple[nn.Module, str, float]:
    """A network trained on the context's data (90%, stratified; the other 10% give its validation accuracy),
    cached by data hash, architecture and settings. Returns ``(model on ctx.device, artifact folder, val accuracy)``."""
    from attar.data.artifact import data_hash
    from attar.distill.objectives import build_objective
    from attar.metrics import classification_metrics
    from attar.models import build_model, load_model, save_model
    from attar.paths import home
    from attar.train.config import TrainConfig
    from attar.train.trainer import Trainer, predict

    key = {"data": ctx.data_hash or data_hash(ctx.x, ctx.y), "spec": spec.model_dump(mode="json", exclude_none=True),
           "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "version": _TEACHER_VERSION,
           "input_shape": list(ctx.input_shape), "classes": ctx.num_classes}
    blob = json.dumps(key, sort_keys=True).encode()
    folder = home() / "cache" / f"condense-teacher-{hashlib.sha256(blob).hexdigest()[:20]}"
    if (folder / "manifest.json").exists():
        model, info = load_model(folder)
        return model.to(ctx.device).eval(), str(folder), float(info["val_accuracy"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(seed, "teacher-init"))
        model = build_model(spec, ctx.input_shape, ctx.num_classes, ctx.mean, ctx.std)
    if need_bn and not bn_layers(model):
        raise AttarError(f"{method} matches BatchNorm statistics, but the teacher model {key['spec']} has no BatchNorm "
                         "layers; use {arch: convnet, args: {norm: batchnorm}} or a resnet for teacher_model.")
    tr, val = _split(ctx, seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=5e-4,
                      schedule="cosine", device=ctx.device.type)
    model = model.to(ctx.device)
    Trainer(model, build_objective({"name": "ce"}), ctx.x[tr], ctx.y[tr], cfg, seed=seed_of(seed, "teacher"),
            name=f"{method} teacher", num_classes=ctx.num_classes, drop_last=False, inner=True).fit()
    acc = float(classification_metrics(predict(model, ctx.x[val].to(ctx.device)).cpu(), ctx.y[val])["accuracy"])
    save_model(folder, model.cpu(), extra={"val_accuracy": acc, "trained_for": key, "val_rows": len(val)})
    return model.to(ctx.device).eval(), str(folder), acc


# --------------------------------------------------------------------------------------------------
# Recovery
# --------------------------------------------------------------------------------------------------


def recover(ctx: CondenseContext, members: Sequence[nn.Module], priors: Sequence[float], p: Any, name: str,
            min_scale: Callable[[int, int], float], voter: str = "equal", vote_temperature: float = 5.0,
            selected: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Recover ``ipc`` images per class from ``members`` (see the module doc); returns ``(images [C·ipc, ...] in
    [0, 1], log)``. Each iteration steps every image once: the images go through in batches of ``p.batch_size``
    (image ``j`` of every class together, as the reference code), BatchNorm statistics are per batch. With
    ``selected``, a random subset of that many members votes in each iteration (CV-DD)."""
    for m in members:
        m.eval()
        for q in m.parameters():
            q.requires_grad_(False)
    hooks = [BNStatHooks(m, p.first_bn_multiplier) for m in members]
    to_z, from_z = standardise(ctx)
    g0 = gen(ctx.seed, name, "init")
    if p.from_real:
        z = to_z(ctx.real_batch(ctx.ipc, g0)[0])
    else:
        z = torch.randn((ctx.num_classes * ctx.ipc, *ctx.input_shape), generator=g0).to(ctx.device)
    z = z.detach().requires_grad_(True)
    y = ctx.labels().to(ctx.device)
    order = torch.arange(len(y)).view(ctx.num_classes, ctx.ipc).t().flatten()  # image j of every class together
    batches = [order[i:i + p.batch_size] for i in range(0, len(order), p.batch_size)]
    opt = torch.optim.Adam([z], lr=p.lr, betas=(0.5, 0.9), eps=1e-8)
    jitter = p.jitter if p.jitter is not None else max(1, min(ctx.input_shape[-2:]) // 8)
    log: dict[str, Any] = {"ce": [], "bn": [], "min_scale": []}
    total = max(1, ctx.iterations)
    try:
        for it in range(ctx.iterations):
            if not ctx.keep_going(it):
                break
            for group in opt.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * it / total)) * p.lr
            g = gen(ctx.seed, name, it)
            lo = min_scale(it, total)
            who = list(range(len(members)))
            if selected is not None and selected < len(members):
                who = sorted(torch.randperm(len(members), generator=g)[:selected].tolist())
            w = vote_weights([priors[i] for i in who], voter, vote_temperature)
            opt.zero_grad(set_to_none=True)
            ce_sum = bn_sum = 0.0
            for idx in batches:
                x = from_z(z[idx.to(ctx.device)])
                x = roll_jitter(random_resized_crop(x, (lo, 1.0), g, flip=p.flip), jitter, g)
                loss = 0.0
                for wi, i in zip(w, who):
                    ce = F.cross_entropy(members[i](x), y[idx.to(ctx.device)])
                    bn = hooks[i].loss()
                    loss = loss + wi * (ce + p.r_bn * bn)
                    ce_sum += wi * float(ce.detach()) * len(idx) / len(y)
                    bn_sum += wi * float(bn.detach()) * len(idx) / len(y)
                loss.backward()
            opt.step()
            with torch.no_grad():
                z.copy_(to_z(from_z(z).clamp(0, 1)))
            log["ce"].append(ce_sum)
            log["bn"].append(bn_sum)
            log["min_scale"].append(lo)
            ctx.step(it, ce=ce_sum, bn=bn_sum, min_scale=lo)
    finally:
        for h in hooks:
            h.remove()
    return from_z(z).detach().clamp(0, 1).cpu(), log


def summary(log: dict[str, list[float]]) -> dict[str, Any]:
    """First and last CE and BN-statistic loss of a recovery (for the artifact's metadata)."""
    out: dict[str, Any] = {}
    for k in ("ce", "bn"):
        v = log.get(k) or []
        out[f"{k}_first"], out[f"{k}_last"] = (round(v[0], 6), round(v[-1], 6)) if v else (None, None)
    ms = log.get("min_scale") or []
    out["min_scale_first"], out["min_scale_last"] = (round(ms[0], 4), round(ms[-1], 4)) if ms else (None, None)
    return out
