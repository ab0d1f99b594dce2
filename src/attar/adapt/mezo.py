"""MeZO (Malladi et al. 2023): zeroth-order fine-tuning with forward passes only.

Each step draws a seed, perturbs every trainable parameter in place by ``+ε·z``, runs the loss,
moves to ``−ε·z``, runs it again, and restores ``θ``; ``z ~ N(0, I)`` is never stored: it is
regenerated from the seed, one parameter at a time, for each of the four passes (+ε, −2ε, +ε,
update). The projected gradient ``g = (L₊ − L₋)/(2ε)`` gives the update ``θ ← θ − lr·(g·z + wd·θ)``.
No autograd graph is built, so peak memory is the model plus one forward pass's activations plus
the largest single parameter (one ``z`` at a time): inference level.

:class:`MeZO` is the optimizer (any closure that returns a loss). :class:`MeZOStep` is the Trainer's
step strategy for it, so a MeZO run has the Trainer's data order, schedule, validation, NaN guard,
checkpoints, resume, SIGTERM stop and progress; :func:`mezo_fit` is that run in one call. The loss
can be non-differentiable.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attar.errors import AttarError
from attar.train.config import TrainConfig
from attar.train.objective import Objective
from attar.train.strategy import StepStrategy
from attar.train.trainer import Trainer, TrainResult


class MeZOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-3, gt=0, description="perturbation scale ε")


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD over ``params`` (the ones with ``requires_grad``, or all given).

    An ``Optimizer`` (one param group holding ``lr``, ``eps``, ``weight_decay``) so the Trainer schedules its
    learning rate and checkpoints it like any other; it keeps no per-parameter state.
    """

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0):
        params = list(params)
        if not params:
            raise AttarError("MeZO got no parameters to train.")
        super().__init__(params, {"lr": float(lr), "eps": float(eps), "weight_decay": float(weight_decay)})

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

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
        group = self.param_groups[0]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        self._perturb(seed, eps)
        l_plus = float(closure())
        self._perturb(seed, -2 * eps)
        l_minus = float(closure())
        self._perturb(seed, eps)
        g = (l_plus - l_minus) / (2 * eps)
        if math.isfinite(g):
            for p, z in self._z_stream(seed):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(z, alpha=-lr * g)
        return 0.5 * (l_plus + l_minus), g


class MeZOStep(StepStrategy):
    """The Trainer's step as one MeZO step per micro-batch (``train.optimizer``/``momentum``/``grad_clip``/
    ``accumulate`` do not apply: plain zeroth-order SGD). ``z`` is drawn from ``(seed, 5, step)`` and both
    perturbed passes see the dropout masks of ``(seed, 4, step)``, so a resumed run takes the same steps."""

    accumulates = False

    def __init__(self, config: MeZOConfig | None = None):
        self.config = config or MeZOConfig()

    def check(self, objective: Objective) -> None:
        if objective.needs_teacher:
            raise AttarError("MeZO fine-tuning takes teacher-free objectives (e.g. ce).")

    def spec(self) -> dict:
        return {"strategy": "mezo", "eps": self.config.eps}

    def optimizer(self, cfg: TrainConfig, params) -> MeZO:
        return MeZO(params, cfg.lr, self.config.eps, cfg.weight_decay)

    def micro_step(self, trainer, runner, batch, opt, step):
        dropout = trainer.rng_seed(4, step)

        def closure() -> float:
            torch.manual_seed(dropout)  # the same dropout masks for both perturbations
            return float(trainer.reduce(runner(batch)[0]["loss"].detach()))

        loss, _g = opt.step(closure, seed=trainer.rng_seed(5, step))
        return {"loss": torch.tensor(loss, dtype=torch.float64)}, None


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
    """Train ``model`` with MeZO steps: a :class:`~attar.train.trainer.Trainer` run with :class:`MeZOStep`."""
    return Trainer(model, objective, train_x, train_y, config, seed=seed, val=val, ckpt_dir=ckpt_dir,
                   on_metrics=on_metrics, name=name, num_classes=num_classes,
                   strategy=MeZOStep(mezo)).fit(resume=resume)
