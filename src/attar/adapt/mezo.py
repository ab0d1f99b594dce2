"""MeZO (Malladi et al. 2023): zeroth-order fine-tuning with forward passes only.

Each step draws a seed, perturbs every trainable parameter in place by ``+ε·z``, runs the loss,
moves to ``−ε·z``, runs it again, and restores ``θ``; ``z ~ N(0, I)`` is never stored: it is
regenerated from the seed, one parameter at a time, for each of the four passes (+ε, −2ε, +ε,
update). The projected gradient ``g = (L₊ − L₋)/(2ε)`` gives the update ``θ ← θ − lr·(g·z + wd·θ)``.
No autograd graph is built, so peak memory is the model plus one forward pass's activations plus
the largest single parameter (one ``z`` at a time): inference level.

:class:`MeZO` is the optimizer (any closure that returns a loss); :func:`mezo_fit` trains like
:class:`attar.train.trainer.Trainer` (same data order, schedule, validation, checkpoints and
resume) with MeZO steps. The loss can be non-differentiable.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attar.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from attar.errors import AttarError
from attar.train.objective import Objective
from attar.train.config import TrainConfig
from attar.train.progress import StepProgress
from attar.train.schedule import lr_at
from attar.train.trainer import Trainer, TrainingDiverged, TrainResult, _seed_for


class MeZOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-3, gt=0, description="perturbation scale ε")


class MeZO:
    """Zeroth-order SGD over ``params`` (the ones with ``requires_grad``, or all given)."""

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0):
        self.params = [p for p in params]
        if not self.params:
            raise AttarError("MeZO got no parameters to train.")
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)

    def _z_stream(self, seed: int):
        gens: dict[torch.device, torch.Generator] = {}
        for p in self.params:
            g = gens.get(p.device)
            if g is None:
                g = gens[p.device] = torch.Generator(device=p.device)
                g.manual_seed(int(seed))
            yield p, torch.randn(p.shape, generator=g, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def _perturb(self, seed: int, scale: float) -> None:
        for p, z in self._z_stream(seed):
            p.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor | float], seed: int) -> tuple[float, float]:
        """One MeZO step; ``closure`` evaluates the loss at the current parameters. Returns (loss, projected grad)."""
        self._perturb(seed, self.eps)
        l_plus = float(closure())
        self._perturb(seed, -2 * self.eps)
        l_minus = float(closure())
        self._perturb(seed, self.eps)
        g = (l_plus - l_minus) / (2 * self.eps)
        if math.isfinite(g):
            for p, z in self._z_stream(seed):
                if self.weight_decay:
                    p.mul_(1 - self.lr * self.weight_decay)
                p.add_(z, alpha=-self.lr * g)
        return 0.5 * (l_plus + l_minus), g


def mezo_fit(
    model: nn.Module,
    objective: Objective,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    config: TrainConfig,
    mezo: MeZOConfig | None = None,
    seed: int = 0,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    ckpt_dir=None,
    on_metrics=None,
    name: str = "finetune",
    resume: bool = False,
    num_classes: int | None = None,
) -> TrainResult:
    """Train with MeZO steps; data order, learning-rate schedule and validation as in the Trainer.

    ``config.optimizer``/``momentum``/``grad_clip``/``accumulate`` do not apply (one batch per step,
    plain zeroth-order SGD). Checkpoints hold the model and the position only: MeZO has no state.
    """
    mezo = mezo or MeZOConfig()
    if objective.needs_teacher:
        raise AttarError("MeZO fine-tuning takes teacher-free objectives (e.g. ce).")
    tr = Trainer(model, objective, train_x, train_y, config, seed=seed, val=val, ckpt_dir=ckpt_dir, name=name,
                 num_classes=num_classes)
    objective.setup(model, [], num_classes or 0, len(tr.x))
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = MeZO(params, config.lr, mezo.eps, config.weight_decay)
    step, epoch0, micro0, history, elapsed, seen = 0, 0, 0, [], 0.0, 0
    if resume and tr.ckpt_dir is not None and (ck := latest_checkpoint(tr.ckpt_dir)) is not None:
        tensors, state = read_checkpoint(ck)
        if state.get("config_hash") != tr._config_hash():
            raise AttarError(f"{ck} was written with different training settings; resume needs the same ones.")
        model.load_state_dict(tensors["model"])
        step, epoch0, micro0, history, elapsed, seen = (state[k] for k in ("step", "epoch", "micro", "history", "elapsed", "seen"))
    per_epoch = tr.steps_per_epoch * config.accumulate  # micro-batches; each is one MeZO step here
    total = per_epoch * config.epochs
    t0 = time.perf_counter() - elapsed
    model.train()

    def save(epoch: int, micro: int) -> None:
        if tr.ckpt_dir is None:
            return
        write_checkpoint(tr.ckpt_dir / f"step-{step:08d}", {"model": model.state_dict()},
                         {"kind": "mezo-state", "step": step, "epoch": epoch, "micro": micro, "history": history,
                          "config_hash": tr._config_hash(), "elapsed": time.perf_counter() - t0, "seen": seen})
        for old in sorted(tr.ckpt_dir.glob("step-*"))[:-2]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)

    with StepProgress(name, total, completed=step) as bar:
        for epoch in range(epoch0, config.epochs):
            order = tr._epoch_order(epoch)
            eloss, en = 0.0, 0
            for micro in range(micro0 if epoch == epoch0 else 0, per_epoch):
                batch = tr._micro_batch(order, epoch, micro)
                lr = lr_at(step, total, per_epoch, config.lr, config.schedule, config.warmup_steps,
                           config.step_every, config.step_gamma)
                opt.lr = lr
                dseed = _seed_for(seed, 4, step)

                def closure() -> float:
                    torch.manual_seed(dseed)  # the same dropout masks for both perturbations
                    return float(objective(batch, model(batch.x))["loss"])

                loss, _g = opt.step(closure, seed=_seed_for(seed, 5, step))
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"stage {name!r}: the MeZO loss became {loss} at step {step}; lower lr or eps.")
                step += 1
                seen += len(batch.y)
                eloss, en = eloss + loss, en + 1
                bar.update(1, loss=loss, lr=lr)
                if on_metrics and (step % 10 == 0 or step == 1):
                    on_metrics(step, {"train_loss": loss, "lr": lr})
            rec = {"step": step, "epoch": epoch + 1, "train_loss": eloss / max(1, en), "seconds": time.perf_counter() - t0}
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                rec |= tr.evaluate()
            history.append(rec)
            if on_metrics:
                on_metrics(step, {k: float(v) for k, v in rec.items() if k != "step"})
            save(epoch + 1, 0)
    return TrainResult(model=model, history=history, steps=step, seconds=time.perf_counter() - t0, samples_seen=seen)
