"""Shared machinery of the subset-selection baselines (herding, k-center): class-padded features.

Features of every candidate row are computed once by a network (a randomly initialised one, one
trained briefly on the real data, or a given model artifact) and laid out as ``[C, n_max, D]`` with
a validity mask, so each greedy step runs for all classes at once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from attar.condense.base import CondenseContext, Params, embed_fn, gen, seed_of
from attar.errors import AttarError
from attar.models import load_model


class SelectionParams(Params):
    features: str = Field(
        "random",
        description="feature space: 'random' (a freshly initialised net), 'trained' (the net trained briefly on the "
        "real data), or the path of a model artifact",
    )
    pool: int | None = Field(None, gt=0, description="consider at most this many random rows per class (None: all)")
    train_epochs: int = Field(1, ge=1, description="epochs of training for features: trained")
    batch_size: int = Field(512, ge=1, description="rows per forward pass when embedding")


def feature_net(ctx: CondenseContext, p: SelectionParams):
    if p.features == "random":
        return ctx.fresh_model("features")
    if p.features == "trained":
        from attar.distill.objectives import build_objective
        from attar.train.config import TrainConfig
        from attar.train.trainer import Trainer

        model = ctx.fresh_model("features")
        keep = ctx.y >= 0
        cfg = TrainConfig(epochs=p.train_epochs, batch_size=256, optimizer="sgd", lr=0.01, momentum=0.9,
                          weight_decay=5e-4, schedule="cosine")
        Trainer(model, build_objective({"name": "ce"}), ctx.x[keep], ctx.y[keep], cfg, seed=seed_of(ctx.seed, "features"),
                name="features", num_classes=ctx.num_classes).fit()
        return model
    path = Path(p.features)
    if not path.exists():
        raise AttarError(f"features must be 'random', 'trained' or an existing model artifact folder; got {p.features!r}.")

    model, info = load_model(path)
    if tuple(info["input_shape"]) != ctx.input_shape:
        raise AttarError(f"feature model {path} takes inputs {tuple(info['input_shape'])}, the data has {ctx.input_shape}.")
    return model.to(ctx.device)


@torch.inference_mode()
def class_features(ctx: CondenseContext, p: SelectionParams, tag: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(feats [C, n, D], valid [C, n], rows [C, n])`` for the candidate rows of every class."""
    table = ctx.index.table
    valid = ctx.index.valid
    if p.pool is not None and p.pool < table.shape[1]:
        keys = torch.rand(table.shape, generator=gen(ctx.seed, tag, "pool")).masked_fill(~valid, -1.0)
        pick = keys.topk(p.pool, dim=1).indices
        table, valid = table.gather(1, pick), valid.gather(1, pick)
    net = feature_net(ctx, p).eval()
    f = embed_fn(net)
    flat = table[valid]
    feats = torch.cat([f(ctx.x[flat[i : i + p.batch_size]].to(ctx.device)).float().cpu()
                       for i in range(0, len(flat), p.batch_size)])
    out = torch.zeros(*table.shape, feats.shape[1])
    out[valid] = feats
    return out, valid, table


def herding_select(feats: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy herding (Welling 2009) for every class at once: positions ``[C, k]`` into ``feats [C, n, D]``.

    Step t picks the row whose addition brings the mean of the chosen rows closest to the class mean,
    so the first pick is the row closest to the mean.
    """
    c, n, _ = feats.shape
    vf = valid.to(feats.dtype)
    mu = (feats * vf[..., None]).sum(1) / vf.sum(1, keepdim=True).clamp_min(1)
    chosen = torch.zeros(c, n, dtype=torch.bool)
    acc = torch.zeros_like(mu)
    picks = []
    for t in range(1, k + 1):
        cand = (acc[:, None, :] + feats) / t
        d = (cand - mu[:, None, :]).norm(dim=-1)
        d = d.masked_fill(~valid | chosen, float("inf"))
        i = d.argmin(dim=1)
        picks.append(i)
        chosen[torch.arange(c), i] = True
        acc = acc + feats[torch.arange(c), i]
    return torch.stack(picks, 1)


def kcenter_select(feats: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center (Sener & Savarese 2018) for every class at once: positions ``[C, k]``.

    The first centre is the row closest to the class mean; each next one is the row farthest from
    its nearest chosen centre.
    """
    c, n, _ = feats.shape
    vf = valid.to(feats.dtype)
    mu = (feats * vf[..., None]).sum(1) / vf.sum(1, keepdim=True).clamp_min(1)
    ar = torch.arange(c)
    first = (feats - mu[:, None]).norm(dim=-1).masked_fill(~valid, float("inf")).argmin(1)
    picks = [first]
    mind = (feats - feats[ar, first][:, None]).norm(dim=-1)
    for _ in range(1, k):
        score = mind.masked_fill(~valid, -1.0)
        score[ar[:, None], torch.stack(picks, 1)] = -1.0
        i = score.argmax(1)
        picks.append(i)
        mind = torch.minimum(mind, (feats - feats[ar, i][:, None]).norm(dim=-1))
    return torch.stack(picks, 1)
