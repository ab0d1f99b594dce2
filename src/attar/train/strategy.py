"""Step strategies: how one optimisation step turns micro-batches into an update.

The Trainer owns everything around a step: data order, learning-rate schedule, NaN guard, checkpoints,
stop requests, callbacks and progress. A strategy owns only the step itself, so a method that updates
weights differently (zeroth-order MeZO, :mod:`attar.adapt.mezo`) gets all of the rest, resume included,
by being one small class instead of a second loop. Its optimizer is a ``torch.optim.Optimizer`` (learning
rate in ``param_groups``, state in ``state_dict``) because that is what the Trainer schedules and
checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from attar.train.config import TrainConfig
from attar.train.objective import Batch, Objective


class StepStrategy:
    """Base class. ``micro_step`` runs once per micro-batch; ``update`` once per optimisation step."""

    #: False: every micro-batch is a step of its own (``train.accumulate`` does not apply)
    accumulates: bool = True

    def check(self, objective: Objective) -> None:
        """Refuse, before any work, an objective this strategy cannot train."""

    def spec(self) -> dict | None:
        """What a checkpoint must agree on to be resumed with this strategy (None: nothing beyond the config)."""
        return None

    def optimizer(self, cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:  # pragma: no cover
        raise NotImplementedError

    def micro_step(self, trainer, runner: nn.Module, batch: Batch, opt: torch.optim.Optimizer,
                   step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:  # pragma: no cover
        """Named losses of ``batch`` (key ``"loss"``) and the model's outputs on it (None if it has no clean ones)."""
        raise NotImplementedError

    def update(self, trainer, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """Apply the step after the last micro-batch of an accumulation window."""


class Backprop(StepStrategy):
    """Gradients by autograd, accumulated over ``train.accumulate`` micro-batches, then AdamW or SGD."""

    def optimizer(self, cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if cfg.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                   nesterov=cfg.momentum > 0)
        st, proj = cfg.optimizer_state, cfg.projection
        if proj is not None or (st is not None and st.dtype != "float32"):  # compact state (FP8 / GaLore)
            from attar.train.adamw import CompactAdamW

            kw: dict = {}
            if st is not None:
                kw |= dict(state_dtype=st.dtype, expansion=st.expansion == "dynamic", group=st.group)
            if proj is not None:
                kw |= dict(rank=proj.rank, update_every=proj.update_every, scale=proj.scale)
            return CompactAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def micro_step(self, trainer, runner, batch, opt, step):
        with autocast(trainer):
            losses, outputs = runner(batch)
        (losses["loss"] / trainer.accumulate).backward()
        return losses, outputs

    def update(self, trainer, opt, params) -> None:
        if trainer.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, trainer.cfg.grad_clip)
        opt.step()


def autocast(trainer) -> torch.autocast:
    """The forward pass in ``train.dtype`` (bfloat16 under autocast; float32: a no-op context)."""
    return torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.cfg.dtype == "bfloat16")


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors-ready tensors plus JSON (param groups, scalar state)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}
