"""AdaMerging (Yang et al., ICLR 2024): task-arithmetic coefficients learned by entropy minimisation at test time.

    θ(λ) = θ_0 + Σ_k λ_k τ_k,   τ_k = θ_k − θ_0                      (task-wise: one λ per model)
    θ(λ)_p = θ_0,p + Σ_k λ_{k,p} τ_{k,p}                               (layer-wise: one λ per model and parameter tensor)
    min_λ  Σ_t H(softmax(f(x_t; θ(λ)))),  x_t a batch of task t's unlabeled inputs

Each step draws one batch of every task's unlabeled inputs, sums the mean Shannon entropies of the merged
model's predictions (FusionBench's ``entropy_loss``: −Σ p log(p + 1e-8)) and takes one Adam step on λ.
The forward is functional (``torch.func.functional_call`` on one template model), so memory is one
merged model plus the task vectors. Defaults follow FusionBench's CLIP config: λ starts at 0.3, Adam with
lr 1e-3, no clamping. Buffers (BatchNorm statistics) are not learned: they follow task arithmetic at the
current coefficients' mean per model (FusionBench keeps the pretrained model's; models without buffers
are unaffected).
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, Sequence

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from attar.errors import AttarError
from attar.merge.methods._state import check_same_keys, logits_of
from attar.merge.methods.base import MergeMethod, StateDict, register
from attar.merge.methods.params import F32_MAX
from attar.merge.methods.soup import ModelMergeResult
from attar.registry import Params
from attar.rng import generator

Mode = Literal["task", "layer"]


def entropy(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over rows (positions of a sequence count as rows)."""
    p = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    return -(p * torch.log(p + eps)).sum(-1).mean()


def task_batches(x: torch.Tensor, batch_size: int, seed: int, task: int) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of task ``task``'s rows, a function of (seed, task, epoch) only."""
    epoch = 0
    while True:
        perm = torch.randperm(len(x), generator=generator(seed, "adamerging", task, epoch))
        for i in range(0, len(x), batch_size):
            yield x[perm[i : i + batch_size]]
        epoch += 1


def adamerging(
    template: nn.Module,
    base: StateDict,
    state_dicts: Sequence[StateDict],
    data: Sequence[torch.Tensor | Iterator[Any]],
    *,
    mode: Mode = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 100,
    batch_size: int = 16,
    clamp: bool = False,
    seed: int = 0,
) -> ModelMergeResult:
    """Learn λ on ``data`` (one entry per task: a tensor of unlabeled rows, or an endless iterator of batches)
    and return θ(λ). ``template`` is any module of the architecture (it is only called functionally).

    ``info``: ``lambdas`` (task: [K]; layer: [K][P], P the parameter tensors in ``info["parameters"]`` order),
    ``entropy`` (the summed loss before each step, then after the last), ``mode``, ``steps``."""
    names = check_same_keys([base, *state_dicts])
    if not state_dicts:
        raise AttarError("adamerging needs at least one fine-tuned model besides the base.")
    trainable = {n for n, _ in template.named_parameters()}
    params = [n for n in names if n in trainable and base[n].is_floating_point()]
    buffers = [n for n in names if n not in trainable and base[n].is_floating_point()]
    dev = next(iter(base.values())).device
    base_f = {n: base[n].detach().float() for n in names if base[n].is_floating_point()}
    tau = [{n: sd[n].detach().float().to(dev) - base_f[n] for n in params + buffers} for sd in state_dicts]
    k = len(state_dicts)
    shape = (k,) if mode == "task" else (k, len(params))
    lam = torch.full(shape, float(init), dtype=torch.float32, device=dev, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    streams = [task_batches(d, batch_size, seed, t) if isinstance(d, torch.Tensor) else iter(d) for t, d in enumerate(data)]
    fixed = {n: base[n] for n in names if not base[n].is_floating_point()}

    def merged(coef: torch.Tensor) -> dict[str, torch.Tensor]:
        c = coef.clamp(0, 1) if clamp else coef
        out = dict(fixed)
        for j, n in enumerate(params):
            col = c if mode == "task" else c[:, j]
            out[n] = base_f[n] + sum(col[i] * tau[i][n] for i in range(k))
        mean = (c if mode == "task" else c.mean(1)).detach()
        for n in buffers:
            out[n] = base_f[n] + sum(mean[i] * tau[i][n] for i in range(k))
        return out

    was = template.training
    template.eval()
    history: list[float] = []
    try:
        for _ in range(steps):
            state = merged(lam)
            loss = sum(entropy(logits_of(functional_call(template, state, (next(s),)))) for s in streams)
            history.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            state = merged(lam)
            history.append(float(sum(entropy(logits_of(functional_call(template, state, (next(s),)))) for s in streams)))
    finally:
        template.train(was)
    out = {n: (v.detach().to(base[n].dtype) if n in base_f else v) for n, v in state.items()}
    final = (lam.clamp(0, 1) if clamp else lam).detach()
    return ModelMergeResult(out, {"mode": mode, "lambdas": final.tolist(), "parameters": params,
                                  "entropy": history, "steps": steps})


def _run(state_dicts: Sequence[StateDict], *, base: StateDict | None = None, models: Sequence[nn.Module] | None = None,
         data: Sequence[Any] | None = None, **kw: Any) -> ModelMergeResult:
    if base is None or not models or data is None:
        raise AttarError("adamerging needs the base (pretrained) state dict, a template model and unlabeled inputs: "
                         "pass base=..., models=[...], data=[...] (one input set per task).")
    kw = {k: kw[k] for k in ("mode", "init", "lr", "steps", "batch_size", "clamp", "seed") if k in kw}
    return adamerging(models[0], base, state_dicts, data, **kw)


class AdaMergingParams(Params):
    """Read by a recipe's merge stage: the unlabeled inputs are each model's own data's ``split`` rows."""

    mode: Mode = Field("layer", description="task: one coefficient per model; layer: one per model and parameter tensor")
    init: float = Field(0.3, ge=-F32_MAX, le=F32_MAX, description="initial coefficient (FusionBench: 0.3)")
    lr: float = Field(1e-3, gt=0.0, le=F32_MAX, description="Adam learning rate on the coefficients")
    steps: int = Field(100, ge=1, le=10**9, description="Adam steps, each on one batch of every task (FusionBench: 1000)")
    batch_size: int = Field(16, ge=1, le=10**9, description="unlabeled rows per task per step (a whole number)")
    clamp: bool = Field(False, description="clamp the coefficients to [0, 1]")
    split: Literal["val", "test", "train"] = Field(
        "val", description="whose inputs (labels unused): val (default), test (the paper's transductive setting), train")


register(
    MergeMethod(
        name="adamerging",
        summary="AdaMerging: task-arithmetic coefficients (per model or per layer) learned by entropy minimisation on unlabeled inputs",
        level="model",
        run=_run,
        base="required",
        min_models=1,
        Params=AdaMergingParams,
        reference="https://arxiv.org/abs/2310.02575",
    )
)
