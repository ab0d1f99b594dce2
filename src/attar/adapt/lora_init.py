"""attar's LoRA initialisers where PEFT's differ: from the gradient (LoRA-GA) or the activations (EVA).

PiSSA is PEFT's own (``init_lora_weights="pissa"``); why these two are not is said in ``attar.adapt.lora``.
:func:`top_svd` also ranks LIFT's principal weights. All SVDs run in float32 on the weight's device;
matrices up to 4096 on their short side use the exact SVD, larger ones ``torch.svd_lowrank``
(randomised, 4 power iterations).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from attar.adapt.base import Calibration
from attar.errors import AttarError

EXACT_SVD_MAX = 4096


def top_svd(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets ``U [m, k], S [k], Vh [k, n]`` of a 2-D tensor."""
    m = m.detach().float()
    k = min(k, *m.shape)
    if min(m.shape) <= EXACT_SVD_MAX:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    U, S, V = torch.svd_lowrank(m, q=min(min(m.shape), k + 16), niter=4)
    return U[:, :k], S[:k], V[:, :k].T


def lora_ga(grad: torch.Tensor, rank: int, gamma: float, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA (``ArB2r``, ``stable``): ``A = c·Vh[:r]``, ``B = c·U[:, r:2r]``, ``c = d_out^{1/4}/sqrt(gamma)``.

    With these, the first step's change of ``B@A`` is the projection of the full gradient on its
    top 2r singular directions (the paper's Theorem 3.1).
    """
    if 2 * rank > min(grad.shape):
        raise AttarError(
            f"LoRA-GA on {name or 'a layer'} of shape {tuple(grad.shape)} needs 2*rank <= {min(grad.shape)}; "
            f"lower the rank (now {rank}) or leave this layer out of 'targets'."
        )
    U, S, Vh = top_svd(grad, 2 * rank)
    c = grad.shape[0] ** 0.25 / math.sqrt(gamma)
    return Vh[:rank] * c, U[:, rank : 2 * rank] * c


def full_gradients(model: nn.Module, names: Sequence[str], calib: Calibration, seed: int) -> dict[str, torch.Tensor]:
    """Average gradient of the loss w.r.t. each target Linear's weight over the calibration batches.

    Only those weights require grad meanwhile, so no other gradient is ever stored; the model's
    ``requires_grad`` flags and train/eval mode are restored afterwards.
    """
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight for n in names}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    model.train()
    try:
        for i, (x, y) in enumerate(calib.batches):
            torch.manual_seed(seed * 1000003 + i)  # dropout masks
            loss = calib.loss(model(x), y)
            (loss / len(calib.batches)).backward()
        grads = {n: w.grad.detach().clone() for n, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return grads


@torch.no_grad()
def eva_components(
    model: nn.Module, names: Sequence[str], calib: Calibration, rank: int, rho: float
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """EVA: per target layer, the principal directions of its inputs; ranks redistributed globally.

    Inputs are collected with forward pre-hooks over the calibration batches (padding tokens
    dropped when the model exposes a token mask), centred, and decomposed. Every layer offers its top
    ``round(rho·rank)`` components with their explained-variance ratios; the ``rank × layers`` largest
    ratios overall decide how many each layer keeps. Returns ``{name: A [r_i, d_in]}`` and each
    layer's explained variance captured by its kept components.
    """
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current_mask: list[torch.Tensor | None] = [None]

    def hook_for(name: str):
        def hook(_mod, args):
            h = args[0].detach()
            m = current_mask[0]
            if m is not None and h.dim() == 3 and tuple(m.shape) == tuple(h.shape[:2]):
                h = h[m]
            store[name].append(h.reshape(-1, h.shape[-1]).float())

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for x, _ in calib.batches:
            current_mask[0] = calib.token_mask(x) if calib.token_mask is not None else None
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    max_k = max(1, round(rho * rank))
    comps: dict[str, torch.Tensor] = {}
    ratios: list[tuple[float, str, int]] = []
    for n in names:
        X = torch.cat(store[n])
        X = X - X.mean(0, keepdim=True)
        _, S, Vh = top_svd(X, max_k)
        var = S.square()
        total = X.square().sum().clamp_min(1e-12)
        comps[n] = Vh
        ratios += [(float(v / total), n, i) for i, v in enumerate(var)]
        store[n] = []
    budget = rank * len(names)
    ratios.sort(key=lambda t: -t[0])
    counts = {n: 0 for n in names}
    for _, n, _ in ratios[:budget]:
        counts[n] += 1
    explained = {n: float(sum(r for r, m, i in ratios if m == n and i < counts[n])) for n in names}
    return {n: comps[n][: counts[n]].contiguous() for n in names}, explained
