"""RegMean (Jin et al., 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models").

For every linear layer, the merge that best reproduces each model's outputs on its own inputs
(least squares over all models' inputs X_i) has a closed form::

    W* = (Σ_i G̃_i)^-1 Σ_i G̃_i W_iᵀ         (paper layout, W: [in, out])
       = (Σ_i W_i G̃_i) (Σ_i G̃_i)^-1         (nn.Linear layout, W: [out, in])
    G_i = X_iᵀ X_i / n_i,  G̃_i = α G_i + (1 − α) diag(G_i)

``α`` (``alpha``; FusionBench's ``reduce_non_diagonal_ratio``) shrinks the off-diagonal entries
towards the diagonal: α = 1 is the exact least-squares merge, α = 0 weights each input
feature's column by its energy alone (equal Grams give the plain average). Every other tensor
(biases, norms, embeddings, linear layers no data reached) is averaged, as in the paper and
FusionBench. Grams are accumulated by forward hooks, batch by batch, so only Grams (in × in per
linear layer) are kept, never activations; ``reduce="mean"`` divides each model's Gram by its
number of input rows (FusionBench), ``"sum"`` keeps XᵀX (the paper: more data weighs more).
"""

from __future__ import annotations

from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from pydantic import Field
from torch import nn

from attar.errors import AttarError
from attar.merge.methods._state import check_same_keys, weighted_average
from attar.merge.methods.base import MergeMethod, StateDict, register
from attar.merge.methods.params import Weight
from attar.merge.methods.soup import ModelMergeResult
from attar.registry import Params

Reduce = Literal["mean", "sum"]


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` (subclasses included) by module name: the layers RegMean merges in closed form."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def batches(data: Any, batch_size: int = 32, max_examples: int | None = None) -> Iterator[Any]:
    """Batches of ``data`` (a tensor of rows, or an iterable of batches: tensors, ``(x, y)`` pairs or dicts),
    stopping after exactly ``max_examples`` rows."""
    seen = 0
    rows = data
    if isinstance(rows, torch.Tensor):
        data = (rows[i : i + batch_size] for i in range(0, len(rows), batch_size))
    for b in data:
        if max_examples is not None and seen >= max_examples:
            return
        if isinstance(b, (tuple, list)):
            b = b[0]
        n = len(next(iter(b.values()))) if isinstance(b, Mapping) else len(b)
        if max_examples is not None and seen + n > max_examples:
            keep = max_examples - seen
            b = {k: v[:keep] for k, v in b.items()} if isinstance(b, Mapping) else b[:keep]
            n = keep
        seen += n
        yield b


def weight_key(module: str) -> str:
    """The state-dict name of a linear module's weight (the root module, ``""``, has ``weight``)."""
    return f"{module}.weight" if module else "weight"


def forward(model: Any, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


class GramHooks:
    """Forward hooks accumulating XᵀX (float32) and the row count of each named linear layer's input. Set ``keep``
    (a bool mask over the batch's positions, e.g. the real tokens of padded text) to count only those rows."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.keep: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if self.keep is not None and self.keep.numel() == x.shape[0]:
                x = x[self.keep.reshape(-1).to(x.device)]
            xtx = x.T @ x
            if name in self.grams:
                self.grams[name].add_(xtx)
                self.rows[name] += x.shape[0]
            else:
                self.grams[name], self.rows[name] = xtx, x.shape[0]
        return hook

    def result(self, reduce: Reduce = "mean") -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        if reduce == "sum":
            return self.grams
        return {n: g / self.rows[n] for n, g in self.grams.items()}


@torch.no_grad()
def input_grams(model: nn.Module, data: Any, *, batch_size: int = 32, max_examples: int | None = 256,
                reduce: Reduce = "mean", modules: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """``{linear module name: Gram of its inputs}`` on ``data`` (rows or batches), by streaming forward passes
    (eval mode, restored after). Inputs of shape [..., in] count every position as a row (tokens of a sequence).
    A linear layer the forward never calls gets no Gram (RegMean then averages it)."""
    mods = linear_modules(model)
    if modules is not None:
        mods = {n: mods[n] for n in modules}
    hooks = GramHooks(mods)
    was = model.training
    model.eval()
    try:
        for b in batches(data, batch_size, max_examples):
            forward(model, b)
    finally:
        grams = hooks.result(reduce)
        model.train(was)
    return grams


def regmean_weight(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float,
                   scales: Sequence[float] | None = None) -> torch.Tensor:
    """One linear layer's merged weight ([out, in], float32): (Σ s_i W_i G̃_i)(Σ s_i G̃_i)^-1.

    Input features no model's data reached (a zero row and column in every Gram) are undetermined by the
    least-squares problem; their weight columns get the weighted average instead of a division by zero."""
    s = [1.0] * len(weights) if scales is None else [float(v) for v in scales]
    lhs = torch.zeros_like(grams[0], dtype=torch.float32)
    rhs = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float32)
    for si, w, g in zip(s, weights, grams):
        g = g.float()
        gt = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        lhs.add_(gt, alpha=si)
        rhs.add_(gt @ w.float().T, alpha=si)
    d = torch.diagonal(lhs)
    dead = d.abs() <= 1e-12 * max(float(d.abs().max()), 1e-30)
    if bool(dead.any()):
        avg = sum(si * w.float().T for si, w in zip(s, weights)) / sum(s)
        lhs[dead, :] = 0
        lhs[:, dead] = 0
        lhs[dead, dead] = 1
        rhs[dead] = avg[dead]
    return torch.linalg.solve(lhs, rhs).T.contiguous()


def regmean_merge(
    state_dicts: Sequence[StateDict],
    grams: Sequence[Mapping[str, torch.Tensor]],
    *,
    alpha: float = 0.95,
    weights: Sequence[float] | None = None,
) -> ModelMergeResult:
    """RegMean on state dicts and each model's input Grams (``{module name: [in, in]}``, from :func:`input_grams`).

    ``{module}.weight`` of every module with a Gram in all models is merged in closed form; every other tensor
    is the (``weights``-weighted) average. ``info["regmean"]`` lists the layers merged in closed form,
    ``info["averaged"]`` the floating-point tensors that were averaged."""
    names = check_same_keys(state_dicts)
    if len(grams) != len(state_dicts):
        raise AttarError(f"got Grams for {len(grams)} models but {len(state_dicts)} state dicts; give one set per model.")
    w = [1.0] * len(state_dicts) if weights is None else [float(v) for v in weights]
    if any(v <= 0 for v in w):
        raise AttarError(f"RegMean weights scale each model's Grams and must be > 0; got {w}.")
    out = weighted_average(state_dicts, w)
    merged: list[str] = []
    for module in grams[0]:
        key = weight_key(module)
        if key not in out or not all(module in g for g in grams):
            continue
        ws = [sd[key] for sd in state_dicts]
        gs = [g[module] for g in grams]
        if ws[0].dim() != 2 or tuple(gs[0].shape) != (ws[0].shape[1],) * 2:
            raise AttarError(f"the Gram of {module!r} has shape {tuple(gs[0].shape)}, but its weight is "
                             f"{tuple(ws[0].shape)} ([out, in]): a Gram is [in, in].")
        out[key] = regmean_weight(ws, gs, alpha, w).to(ws[0].dtype)
        merged.append(module)
    averaged = [k for k in names if k not in {weight_key(m) for m in merged} and state_dicts[0][k].is_floating_point()]
    return ModelMergeResult(out, {"regmean": merged, "averaged": averaged, "alpha": alpha})


def _run(state_dicts: Sequence[StateDict], *, models: Sequence[nn.Module] | None = None,
         data: Sequence[Any] | None = None, grams: Sequence[Mapping[str, torch.Tensor]] | None = None,
         weights: Sequence[float] | None = None, alpha: float = 0.95, examples: int = 256, batch_size: int = 32,
         reduce: Reduce = "mean", **_: Any) -> ModelMergeResult:
    """Precomputed ``grams``, or ``models`` with ``data`` (one input set per model, its own)."""
    if grams is None:
        if models is None or data is None or len(models) != len(state_dicts) or len(data) != len(models):
            raise AttarError("regmean needs each model's input Grams: pass grams=[...], or models=[...] and data=[...] (one per model).")
        grams = [input_grams(m, d, batch_size=batch_size, max_examples=examples, reduce=reduce) for m, d in zip(models, data)]
    return regmean_merge(state_dicts, grams, alpha=alpha, weights=weights)


class RegMeanParams(Params):
    """``examples``, ``batch_size`` and ``reduce`` are read by a recipe's merge stage, which computes the Grams
    on each model's own training rows."""

    weight: Weight = 1.0
    alpha: float = Field(0.95, ge=0.0, le=1.0, description="off-diagonal scaling of each Gram: 1 exact least squares, "
                                                           "0 diagonal only (FusionBench's reduce_non_diagonal_ratio)")
    examples: int = Field(256, ge=1, le=10**9, description="input rows per model for its Grams (a whole number)")
    batch_size: int = Field(32, ge=1, le=10**9, description="rows per forward pass (a whole number)")
    reduce: Reduce = Field("mean", description="mean: each Gram divided by its rows (FusionBench); sum: XᵀX (the paper)")


register(
    MergeMethod(
        name="regmean",
        summary="RegMean: closed-form merge of linear layers from each model's input Grams, rest averaged (needs data)",
        level="model",
        run=_run,
        base="none",
        min_models=1,
        Params=RegMeanParams,
        reference="https://arxiv.org/abs/2212.09849",
    )
)
