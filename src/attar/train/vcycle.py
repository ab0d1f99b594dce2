"""V-cycle multi-level training (Zou et al., ICLR 2024, "A Multi-Level Framework for Accelerating Training
Transformer Models"): train the model briefly, train a half-depth copy of it, bring what the copy learned back.

Three operators on the list of transformer blocks (depth only; the paper also halves width, which this module
does not do):

- **coalesce** ``C``: block ``i`` of the smaller model is the average of blocks ``2i`` and ``2i+1``; everything
  outside the block list (embeddings, final norm, head) is copied.
- **de-coalesce** ``D``: back to the larger shape, small block ``i`` copied to both blocks ``2i`` and ``2i+1``.
  ``C(D(s)) = s`` exactly; ``D(C(w)) = w`` exactly when adjacent blocks of ``w`` are equal. ``D(s)`` does **not**
  compute ``s``'s function (each block runs twice), which is why the paper does not start the large model from
  ``D(s)`` alone but interpolates:
- **interpolate**: ``W = (1 - alpha) W_large + alpha D(W_small)``, ``W_large`` the large model's weights before it
  was coalesced (the paper's alpha: 0.25).

The cycle (:func:`run_v_cycle`): level 0 (the stage's model) trains, is coalesced to level 1, which trains, ... down
to the smallest level; then up, each level interpolated from its own weights and the trained level below,
trained, up to level 0, which trains the stage's ``train.steps``. Every phase is one run of the one Trainer (the
caller's ``train_phase``, with the stage's optimizer settings: a fresh optimizer and learning-rate schedule per
phase, as the shapes change); a finished phase leaves its weights in ``<state_dir>/phase-K.safetensors``, so a
killed run resumes from the last finished phase and, inside a phase, from that Trainer's checkpoint.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from attar.checkpoint import atomic_save_safetensors, atomic_write_json
from attar.errors import AttarError
from attar.rng import seed_of
from attar.text.lm_prune import decoder_layers, drop_layers
from attar.train import distributed as dist
from attar.train.config import VCycleConfig

__all__ = ["Phase", "phases", "coalesce", "decoalesce", "interpolate", "check_depth", "run_v_cycle"]


def _block_path(model: nn.Module) -> str:
    blocks = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is blocks)


def check_depth(layers: int, levels: int, field: str = "train.growth.levels") -> None:
    """Refuse a depth that ``levels - 1`` halvings do not divide (the smallest level needs whole pairs)."""
    if layers % 2 ** (levels - 1):
        raise AttarError(f"{field}: {levels} levels halve the depth {levels - 1} times, so the model's {layers} "
                         f"blocks must be a multiple of {2 ** (levels - 1)}; use fewer levels or "
                         f"{layers + (-layers) % 2 ** (levels - 1)} blocks.")


@torch.no_grad()
def coalesce(model: nn.Module) -> nn.Module:
    """``C``: a new model with half the blocks, block ``i`` = the mean of ``model``'s blocks ``2i`` and ``2i+1``
    (integer buffers from block ``2i``); the rest copied. ``model`` is left as it is."""
    check_depth(len(decoder_layers(model)), 2)
    small = copy.deepcopy(model)
    for p in small.parameters():
        p.grad = None
    n = len(decoder_layers(small))
    drop_layers(small, list(range(1, n, 2)))  # keeps blocks 0, 2, 4, ...: config and cache indices follow
    big = decoder_layers(model)
    for i, block in enumerate(decoder_layers(small)):
        a, b = big[2 * i].state_dict(), big[2 * i + 1].state_dict()
        block.load_state_dict({k: (v + b[k]) / 2 if v.is_floating_point() else v for k, v in a.items()})
    return small


def decoalesce(small: nn.Module, large: nn.Module) -> dict[str, torch.Tensor]:
    """``D``: ``small``'s weights in ``large``'s shape (a state dict for ``large``): block ``j`` = small block
    ``j // 2``, everything else small's own."""
    s_path, l_path = _block_path(small) + ".", _block_path(large) + "."
    n_small, n_large = len(decoder_layers(small)), len(decoder_layers(large))
    if n_large != 2 * n_small:
        raise AttarError(f"v_cycle: de-coalescing doubles the depth, but the small model has {n_small} blocks and "
                         f"the large one {n_large}.")
    src = small.state_dict()
    out = {}
    for key, t_val in large.state_dict().items():
        skey = key
        if key.startswith(l_path) and key[len(l_path):].split(".", 1)[0].isdigit():
            j, rest = key[len(l_path):].split(".", 1)
            skey = f"{s_path}{int(j) // 2}.{rest}"
        if skey not in src or src[skey].shape != t_val.shape:
            raise AttarError(f"v_cycle: the large model's tensor {key!r} has no counterpart {skey!r} of shape "
                             f"{tuple(t_val.shape)} in the small one (the levels must differ only in depth).")
        out[key] = src[skey].detach().clone()
    return out


def interpolate(large: dict[str, torch.Tensor], decoalesced: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) W_large + alpha D(W_small)`` per floating tensor (written that way, not as a lerp, so alpha 0
    returns ``W_large`` and alpha 1 returns ``D(W_small)`` bit for bit); other tensors stay ``W_large``'s."""
    return {k: ((1 - alpha) * v + alpha * decoalesced[k].to(v.device, v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in large.items()}


@dataclass(frozen=True)
class Phase:
    """One Trainer run of the cycle: ``level`` 0 is the stage's model, level ``l`` has ``1/2^l`` of its blocks."""

    index: int
    level: int
    way: str  # "down", "bottom", "up" or "last"
    steps: int


def phases(g: VCycleConfig, last_steps: int) -> list[Phase]:
    """The cycle's phases in order: ``levels - 1`` down, the smallest level, ``levels - 2`` up, the last."""
    n = g.levels
    levels = list(range(n)) + list(range(n - 2, -1, -1))
    ways = ["down"] * (n - 1) + ["bottom"] + ["up"] * (n - 2) + ["last"]
    steps = list(g.steps) + [last_steps]
    return [Phase(i, lv, w, s) for i, (lv, w, s) in enumerate(zip(levels, ways, steps))]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


TrainPhase = Callable[[nn.Module, Phase, int, "Path | None", Any], Any]


def run_v_cycle(model: nn.Module, g: VCycleConfig, last_steps: int, seed: int, train_phase: TrainPhase,
                state_dir: Path | None, last_ckpt_dir: Path | None, resume: bool = False,
                log: Callable[[str], None] | None = None, tokens_per_step: int = 0) -> tuple[Any, list[dict]]:
    """Train ``model`` (fresh, level 0) through the V-cycle; returns the last phase's result and one record a phase.

    ``train_phase(model, phase, seed, ckpt_dir, resume)`` runs the one Trainer for ``phase.steps`` steps and returns
    a result with ``.model`` (and ``.metrics``, read for ``best_val_ppl`` when there). The phases before the last
    train with seeds derived from ``seed`` and the phase (another data order each); the last one with ``seed``
    and ``last_ckpt_dir``, the stage's own checkpoints, as a stage without the cycle would."""
    check_depth(len(decoder_layers(model)), g.levels)
    plan = phases(g, last_steps)
    modules: dict[int, nn.Module] = {0: model}
    before: dict[int, dict[str, torch.Tensor]] = {}  # level -> its weights when it was coalesced
    records: list[dict] = []
    prev: nn.Module | None = None
    res = None
    for ph in plan:
        if ph.way in ("down", "bottom") and ph.level > 0:
            modules[ph.level] = coalesce(prev)
        elif ph.way in ("up", "last"):
            m = modules[ph.level]
            m.load_state_dict(interpolate(before[ph.level], decoalesce(prev, m), g.alpha))
        m = modules[ph.level]
        layers = len(decoder_layers(m))
        record = {"phase": ph.index, "level": ph.level, "way": ph.way, "layers": layers, "steps": ph.steps,
                  "tokens": ph.steps * tokens_per_step, "params": sum(p.numel() for p in m.parameters())}
        done = state_dir / f"phase-{ph.index}.safetensors" if state_dir is not None and ph.way != "last" else None
        if resume and done is not None and done.exists():  # finished before the run stopped: its weights
            m.load_state_dict(load_file(str(done)))
            record = json.loads(done.with_suffix(".json").read_text())
            if log:
                log(f"  v_cycle phase {ph.index} ({ph.way}, {layers} blocks): finished earlier, loaded {done}")
        else:
            if log:
                log(f"  v_cycle phase {ph.index} ({ph.way}, {layers} blocks): {ph.steps} steps")
            last = ph.way == "last"
            ckpt = last_ckpt_dir if last else (state_dir / f"phase-{ph.index}" if state_dir is not None else None)
            res = train_phase(m, ph, seed if last else seed_of(seed, "v_cycle", ph.index), ckpt, resume)
            m = modules[ph.level] = res.model
            best = (getattr(res, "metrics", None) or {}).get("best_val_ppl")
            record |= {"best_val_ppl": best} if best is not None else {}
            if done is not None:
                if dist.is_main():
                    atomic_save_safetensors(_state(m), done)
                    atomic_write_json(done.with_suffix(".json"), record)
                    shutil.rmtree(ckpt, ignore_errors=True)  # the phase's weights are in `done` now
                dist.barrier()
        if ph.way == "down":
            before[ph.level] = _state(m)
        records.append(record)
        prev = m
    return res, records
