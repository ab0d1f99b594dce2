"""The one training loop: data -> model -> objective -> optimizer.

Every source of randomness is derived from ``(seed, epoch)`` for the data order
and ``(seed, step)`` for augmentation and dropout, so the position in the data
and the RNG state are just two integers: a run killed at any step and resumed
from its checkpoint ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from attar import lifecycle
from attar.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from attar.errors import AttarError
from attar.train.objective import Batch, Objective
from attar.train.config import TrainConfig
from attar.train import distributed as dist
from attar.train.progress import StepProgress
from attar.train.schedule import lr_at

MetricsCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(AttarError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    teacher_mode: str = "none"
    samples_seen: int = 0
    selection: dict = field(default_factory=dict)


def _gen(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16))
    return g


def _seed_for(*parts: int) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
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


class _Step(nn.Module):
    """Student + objective as one module, so DDP synchronises the objective's learnable parts too."""

    def __init__(self, student: nn.Module, objective: Objective):
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        logits = self.student(batch.x)
        return self.objective(batch, logits), logits


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else torch.empty(0)
    model.train(was)
    return out


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        config: TrainConfig,
        seed: int = 0,
        teachers: list[nn.Module] | None = None,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        ckpt_dir: str | Path | None = None,
        on_metrics: MetricsCallback | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        teacher_cache=None,
        name: str = "train",
        num_classes: int | None = None,
        selector=None,
        accept_changed_config: bool = False,
    ):
        self.model = model
        self.accept_changed_config = accept_changed_config  # the pipeline checked that only optimiser settings differ
        self.objective = objective
        self.cfg = config
        self.seed = seed
        self.teachers = list(teachers or [])
        self.val = val
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.on_metrics = on_metrics
        self.augment = augment
        self.teacher_cache = teacher_cache
        self.name = name
        self.x, self.y = train_x, train_y
        self.num_classes = num_classes
        self.selector = selector
        if objective.needs_teacher and not self.teachers and teacher_cache is None:
            raise AttarError(f"stage {name!r}: objective {type(objective).__name__} needs a teacher, but none was given.")
        if not objective.needs_teacher:
            keep = self.y >= 0
            if not bool(keep.all()):
                # Rows without labels carry no signal for a teacher-free objective.
                self.x, self.y = self.x[keep], self.y[keep]
        if len(self.x) == 0:
            raise AttarError(f"stage {name!r}: the training split has no usable rows.")
        labeled = torch.nonzero(self.y >= 0).flatten()
        self.labeled_idx = labeled if (config.labeled_batch_size and len(labeled) < len(self.y)) else None
        if config.labeled_batch_size and self.labeled_idx is None:
            self.labeled_idx = labeled if len(labeled) else None
        self.world = dist.world_size()
        self.rank = dist.rank()
        # With a selector, each micro-batch draws `candidates` rows and trains on `batch_size` of them,
        # and an epoch covers the rows the selector keeps for it.
        self.candidates = selector.candidates(config.batch_size) if selector else config.batch_size
        n_rows = selector.rows_per_epoch(len(self.x)) if selector else len(self.x)
        micro = max(1, n_rows // self.candidates)
        self.steps_per_epoch = max(1, micro // config.accumulate)
        self.total_steps = self.steps_per_epoch * config.epochs
        if selector is not None:
            selector.setup(self)  # rows, model, seed and schedule length (static pruning, curricula)

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        order = torch.randperm(len(self.x), generator=_gen(self.seed, 1, epoch))
        if self.selector is not None:
            order = self.selector.epoch_rows(order, epoch, _gen(self.seed, 5, epoch))
        return order

    def _labeled_rows(self, micro_index: int) -> torch.Tensor:
        """Rows of the cycled labeled stream for global micro-batch ``micro_index``."""
        lab = self.labeled_idx
        n, b = len(lab), self.cfg.labeled_batch_size
        start = micro_index * b
        out = []
        while len(out) < b:
            cycle, off = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=_gen(self.seed, 2, cycle))
            take = min(b - len(out), n - off)
            out.extend(lab[perm[off : off + take]].tolist())
        return torch.tensor(out, dtype=torch.long)

    def _micro_batch(self, order: torch.Tensor, epoch: int, micro: int) -> Batch:
        bs = self.candidates
        rows = order[micro * bs : (micro + 1) * bs]
        if self.labeled_idx is not None:
            rows = torch.cat([self._labeled_rows(epoch * self.steps_per_epoch * self.cfg.accumulate + micro), rows])
        rows = rows[self.rank :: self.world]  # each rank takes its shard of the global batch
        x = self.x[rows]
        if self.augment is not None:
            x = self.augment(x, _gen(self.seed, 3, epoch, micro, self.rank))
        teacher_logits = None
        if self.teacher_cache is not None:
            teacher_logits = self.teacher_cache.logits(rows)
        elif self.objective.needs_teacher:
            with torch.no_grad():
                outs = [t(x) for t in self.teachers]
            teacher_logits = outs[0] if len(outs) == 1 else torch.stack(outs)
        batch = Batch(x=x, y=self.y[rows], idx=rows, teacher_logits=teacher_logits)
        if self.selector is not None:
            self.selector.begin_micro(epoch, micro)
            keep_n = max(1, self.cfg.batch_size // self.world)
            batch = self.selector.timed_select(batch, self.model, keep_n)
        return batch

    # ------------------------------------------------------------------ state
    def _config_hash(self) -> str:
        parts = [self.cfg.model_dump(), self.seed, len(self.x), self.world]
        if self.selector is not None:  # a resume with another selector (or other selector settings) is refused
            parts.append(self.selector.spec())
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _save(self, opt, step: int, epoch: int, micro: int, history: list, elapsed: float, seen: int) -> None:
        if self.ckpt_dir is None:
            return
        if dist.is_main():
            opt_t, opt_meta = optimizer_to_tensors(opt)
            write_checkpoint(
                self.ckpt_dir / f"step-{step:08d}",
                {"model": self.model.state_dict(), "objective": self.objective.state_dict(), "optimizer": opt_t,
                 "selector": self.selector.state_tensors() if self.selector else {}},
                {"kind": "train-state", "step": step, "epoch": epoch, "micro": micro, "history": history,
                 "optimizer": opt_meta, "config_hash": self._config_hash(), "elapsed": elapsed, "seen": seen,
                 "selector_stats": self.selector.stats if self.selector else {}},
            )
            for old in sorted(self.ckpt_dir.glob("step-*"))[:-2]:  # keep the two newest
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _stop_if_asked(self, opt, step: int, epoch: int, micro: int, history: list, t_start: float, seen: int) -> None:
        """SIGTERM or Ctrl-C arrived (see attar.lifecycle): write a checkpoint at this step boundary, then stop.

        Why here: between steps the model, optimiser and position in the data agree, so this checkpoint is as
        good as a periodic one and a resumed run ends with the same weights. Under DDP the ranks agree first.
        """
        signum = lifecycle.stop_requested() or 0
        if self.world > 1:
            flag = torch.tensor([float(signum)], device=next(self.model.parameters()).device)
            if float(dist.all_reduce_mean(flag)) == 0:
                return
            signum = signum or int(signal.SIGTERM)
        elif not signum:
            return
        folder = self.ckpt_dir / f"step-{step:08d}" if self.ckpt_dir else None
        if folder is not None and latest_checkpoint(self.ckpt_dir) != folder:
            self._save(opt, step, epoch, micro, history, time.perf_counter() - t_start, seen)
        raise lifecycle.RunInterrupted(signum, checkpoint=folder)

    def _load(self, opt) -> dict | None:
        ckpt = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        if ckpt is None:
            return None
        tensors, state = read_checkpoint(ckpt)
        if state.get("config_hash") != self._config_hash() and not self.accept_changed_config:
            raise AttarError(
                f"{ckpt} was written with different training settings (or data, seed, world size); "
                "resume needs the same recipe. Start a fresh run or restore the original recipe."
            )
        self.model.load_state_dict(tensors["model"])
        self.objective.load_state_dict(tensors["objective"])
        opt.load_state_dict(optimizer_from_tensors(tensors.get("optimizer", {}), state["optimizer"]))
        for g in opt.param_groups:  # the saved hyper-parameters yield to the config (they differ only on request)
            g["weight_decay"] = self.cfg.weight_decay
            if "momentum" in g:
                g["momentum"] = self.cfg.momentum
        if self.selector is not None:
            self.selector.load_state_tensors(tensors.get("selector", {}))
            self.selector.stats.update(state.get("selector_stats", {}))
        state["path"] = str(ckpt)
        return state

    def _diverged(self, lval: float, step: int, epoch: int, poisoned: str | None) -> str:
        """Drop the checkpoint whose very next loss was not finite; name the newest remaining one in words."""
        if poisoned is not None and dist.is_main():
            shutil.rmtree(poisoned, ignore_errors=True)
        dist.barrier()
        good = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        if good is not None:
            where = (f"The last good checkpoint (its next loss was finite) is {good}; continue from it with a lower "
                     "train.lr or a train.grad_clip by resuming with the changed recipe and --allow-optim-change.")
        else:
            where = ("No checkpoint was written yet, so there is nothing to resume: start again with a lower "
                     "train.lr or a train.grad_clip.")
        return (f"stage {self.name!r}: the loss became {lval} at step {step} (epoch {epoch + 1}); training stopped. "
                f"{where} Also check the inputs for NaN/Inf.")

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        if self.val is None or len(self.val[0]) == 0:
            return {}
        from attar.metrics import classification_metrics

        logits = predict(self.model, self.val[0])
        m = classification_metrics(logits, self.val[1])
        return {"val_accuracy": m["accuracy"], "val_nll": m["nll"]}

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.cfg
        teacher_mode = "none"
        if self.objective.needs_teacher:
            teacher_mode = getattr(self.teacher_cache, "mode", None) or f"live ({len(self.teachers)} teacher(s))"
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        self.objective.setup(self.model, self.teachers, self.num_classes or 0, len(self.x))
        step_mod = _Step(self.model, self.objective)
        params = [p for p in step_mod.parameters() if p.requires_grad]
        opt = self._make_optimizer(params)
        runner: nn.Module = DDP(step_mod) if self.world > 1 else step_mod

        step, epoch0, micro0, history, elapsed, seen = 0, 0, 0, [], 0.0, 0
        state = None
        if resume:
            state = self._load(opt)
            if state is not None:
                step, epoch0, micro0 = state["step"], state["epoch"], state["micro"]
                history, elapsed, seen = state["history"], state["elapsed"], state["seen"]
        # A checkpoint counts as good once the loss of the step after it was finite: the one written just before
        # a divergence may already hold the weights that produce it, and resuming it would only repeat the NaN.
        pending = (state or {}).get("path") if resume else None
        last_save = time.perf_counter()
        self.model.train()
        t_start = time.perf_counter() - elapsed
        micro_per_epoch = self.steps_per_epoch * cfg.accumulate
        with StepProgress(self.name, self.total_steps, completed=step, enabled=None if dist.is_main() else False) as bar, \
                lifecycle.graceful_stop():  # SIGTERM / Ctrl-C: stop at a step boundary below, with a checkpoint
            for epoch in range(epoch0, cfg.epochs):
                order = self._epoch_order(epoch)
                epoch_loss, epoch_n = 0.0, 0
                start_micro = micro0 if epoch == epoch0 else 0
                for micro in range(start_micro, micro_per_epoch):
                    if micro % cfg.accumulate == 0:
                        torch.manual_seed(_seed_for(self.seed, 4, step))  # dropout etc.
                        lr = lr_at(step, self.total_steps, self.steps_per_epoch, cfg.lr, cfg.schedule,
                                   cfg.warmup_steps, cfg.step_every, cfg.step_gamma)
                        for g in opt.param_groups:
                            g["lr"] = lr
                        opt.zero_grad(set_to_none=True)
                    batch = self._micro_batch(order, epoch, micro)
                    losses, _ = runner(batch)
                    loss = losses["loss"]
                    lval = float(dist.all_reduce_mean(loss.detach()))
                    if not math.isfinite(lval):
                        raise TrainingDiverged(self._diverged(lval, step, epoch, pending))
                    pending = None  # the newest checkpoint's next loss was finite: it is good
                    (loss / cfg.accumulate).backward()
                    seen += len(batch.y) * self.world
                    epoch_loss += lval
                    epoch_n += 1
                    if (micro + 1) % cfg.accumulate != 0:
                        continue
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    step += 1
                    rate = seen / max(1e-9, time.perf_counter() - t_start)
                    bar.update(1, loss=lval, lr=lr, **{"samples/s": f"{rate:.0f}"})
                    if self.on_metrics and dist.is_main() and (step % 10 == 0 or step == 1):
                        self.on_metrics(step, {f"train_{k}": float(v.detach()) for k, v in losses.items()} | {"lr": lr})
                    end_of_epoch = micro + 1 == micro_per_epoch
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not end_of_epoch:
                        self._save(opt, step, epoch, micro + 1, history, time.perf_counter() - t_start, seen)
                        last_save = time.perf_counter()
                        pending = str(self.ckpt_dir / f"step-{step:08d}") if self.ckpt_dir else None
                    if not end_of_epoch:
                        self._stop_if_asked(opt, step, epoch, micro + 1, history, t_start, seen)
                self.objective.on_epoch_end(epoch, cfg.epochs)
                rec = {"step": step, "epoch": epoch + 1, "train_loss": epoch_loss / max(1, epoch_n),
                       "seconds": time.perf_counter() - t_start}
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    rec |= self.evaluate()
                history.append(rec)
                if self.on_metrics and dist.is_main():
                    self.on_metrics(step, {k: float(v) for k, v in rec.items() if k != "step"})
                # End-of-epoch checkpoints: the last epoch always; otherwise when checkpoint_every is unset and
                # at least 30 s have passed (many tiny epochs would otherwise spend their time in fsync).
                now = time.perf_counter()
                if epoch + 1 == cfg.epochs or (not cfg.checkpoint_every and now - last_save >= 30.0):
                    self._save(opt, step, epoch + 1, 0, history, now - t_start, seen)
                    pending = str(self.ckpt_dir / f"step-{step:08d}") if self.ckpt_dir else None
                    last_save = now
                self._stop_if_asked(opt, step, epoch + 1, 0, history, t_start, seen)
        final = self.objective.finalize(self.model)
        seconds = time.perf_counter() - t_start
        selection = {}
        if self.selector is not None:  # selection vs training wall time: train_seconds is the rest of the run
            selection = dict(self.selector.stats)
            selection["train_seconds"] = max(0.0, seconds - float(selection.get("select_seconds", 0.0)))
        return TrainResult(model=final, history=history, steps=step, seconds=seconds,
                           teacher_mode=teacher_mode, samples_seen=seen, selection=selection)
