"""The one training loop: data -> model -> objective -> optimizer.

Every source of randomness is derived from ``(seed, epoch)`` for the data order
and ``(seed, step)`` for augmentation and dropout, so the position in the data
and the RNG state are just two integers: a run killed at any step and resumed
from its checkpoint ends with exactly the weights of an uninterrupted run.

Three extension points, so nothing else that trains a network needs a loop of its own:
a **task** (:mod:`attar.train.task`: rows -> batch, model + batch -> losses), a **step
strategy** (:mod:`attar.train.strategy`: backprop by default, MeZO in :mod:`attar.adapt.mezo`)
and **callbacks** (:mod:`attar.train.callbacks`: expert trajectories, forgetting counters).
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
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from attar import lifecycle, rng
from attar.allocator import keep_freed_memory
from attar.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint
from attar.errors import AttarError
from attar.train import distributed as dist
from attar.train import fsdp
from attar.train.callbacks import Callback
from attar.train.config import TrainConfig
from attar.train.objective import Batch, Objective, device_of
from attar.train.progress import StepProgress
from attar.train.schedule import lr_at
from attar.train.strategy import (
    Backprop,
    StepStrategy,
    optimizer_from_tensors,
    optimizer_to_tensors,
)
from attar.train.task import Classification, Task, predict  # noqa: F401  (predict: re-exported, callers import it from here)

MetricsCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(AttarError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class InputUnavailable(AttarError):
    """Something a batch reads from outside the process (a served teacher) did not answer. The trainer then writes a
    checkpoint at the start of the step (its weights and optimiser have not moved in it) and stops with this error,
    so a resume continues exactly once the input is back."""


@dataclass
class TrainResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    teacher_mode: str = "none"
    samples_seen: int = 0
    selection: dict = field(default_factory=dict)


class _Step(nn.Module):
    """Student + objective as one module, so DDP synchronises the objective's learnable parts too."""

    def __init__(self, student: nn.Module, objective: Objective, task: Task):
        super().__init__()
        self.student = student
        self.objective = objective
        self.task = task

    def forward(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.task.forward(self.student, self.objective, batch)


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else CPU; ``cuda`` without one is refused with the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise AttarError("train.device is 'cuda' but this machine has no CUDA device; use device: auto or cpu.")
    return torch.device(name)


class Trainer:
    """``task``, ``strategy``, ``callbacks``: the extension points. ``order(epoch)``: another row order (a function
    of the epoch only, or resume is not exact). ``drop_last=False``: also train on an epoch's last, smaller batch
    (plain steps only). ``inner=True``: a run inside other work (a pruning probe, an MTT expert): no progress
    display, not split across DDP ranks (each runs it alike), the caller's global RNG left as it was, and the model
    trained where the caller put it (a top-level run trains on ``train.device`` and hands the model back where it found
    it). ``train.steps``: a step budget in place of epochs (language models count steps, not passes)."""

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
        *,
        task: Task | None = None,
        strategy: StepStrategy | None = None,
        callbacks: Sequence[Callback] = (),
        order: Callable[[int], torch.Tensor] | None = None,
        drop_last: bool = True,
        inner: bool = False,
        progress: bool | None = None,
    ):
        self.strategy = strategy or Backprop()
        self.strategy.check(objective)
        self.task, self.callbacks, self.order, self.inner = task or Classification(), list(callbacks), order, inner
        self.progress = progress  # None: a bar on a terminal, lines otherwise; False: nothing (the caller reports)
        self.t_start = time.perf_counter()
        self.model, self.objective, self.cfg, self.seed = model, objective, config, seed
        self.device = device_of(model)
        self.accept_changed_config = accept_changed_config  # the pipeline checked that only optimiser settings differ
        self.accumulate = config.accumulate if self.strategy.accumulates else 1
        self.teachers = list(teachers or [])
        self.val, self.on_metrics, self.augment, self.teacher_cache = val, on_metrics, augment, teacher_cache
        self.ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        self.name, self.num_classes, self.selector = name, num_classes, selector
        self.x, self.y = train_x, train_y
        if objective.needs_teacher and not self.teachers and teacher_cache is None:
            raise AttarError(f"stage {name!r}: objective {type(objective).__name__} needs a teacher, but none was given.")
        if not objective.needs_teacher:
            keep = self.y >= 0
            if not bool(keep.all()):
                # Rows without labels carry no signal for a teacher-free objective.
                self.x, self.y = self.x[keep], self.y[keep]
        if len(self.x) == 0:
            raise AttarError(f"stage {name!r}: the training split has no usable rows.")
        if not drop_last and (self.accumulate > 1 or selector is not None):
            raise ValueError("drop_last=False trains plain one-batch steps: no accumulation, no selector")
        labeled = torch.nonzero(self.y >= 0).flatten()
        self.labeled_idx = labeled if (config.labeled_batch_size and len(labeled) < len(self.y)) else None
        if config.labeled_batch_size and self.labeled_idx is None:
            self.labeled_idx = labeled if len(labeled) else None
        self.world = 1 if inner else dist.world_size()
        self.rank = 0 if inner else dist.rank()
        # With a selector, each micro-batch draws `candidates` rows and trains on `batch_size` of them,
        # and an epoch covers the rows the selector keeps for it.
        self.candidates = selector.candidates(config.batch_size) if selector else config.batch_size
        n_rows = selector.rows_per_epoch(len(self.x)) if selector else len(self.x)
        micro = max(1, n_rows // self.candidates if drop_last else math.ceil(n_rows / self.candidates))
        self.steps_per_epoch = max(1, micro // self.accumulate)
        self.total_steps = config.steps or self.steps_per_epoch * config.epochs
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.stop_reason: str | None = None
        self._fsdp: tuple | None = None  # (step module, skeleton, buffers) while an FSDP run trains
        if selector is not None:
            selector.setup(self)  # rows, model, seed and schedule length (static pruning, curricula)
        if config.sparsity is not None:  # SPDF: a callback of the Trainer's own, last (the callers' indices hold)
            from attar.train.sparsity import SPDF

            self.callbacks.append(SPDF(model, config.sparsity, seed))

    # ------------------------------------------------------------------ randomness and ranks
    def generator(self, *parts: int) -> torch.Generator:
        """A CPU generator of ``(seed, *parts)``: the same parts draw the same numbers in a resumed run."""
        return rng.generator(self.seed, *parts)

    def rng_seed(self, *parts: int) -> int:
        return rng.seed_of(self.seed, *parts)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over this run's ranks."""
        return dist.all_reduce_mean(t) if self.world > 1 else t

    def elapsed(self) -> float:
        """Seconds of training so far (those before a resume included)."""
        return time.perf_counter() - self.t_start

    def request_stop(self, reason: str) -> None:
        """Ask the loop to end after this step, as if its budget were spent (a callback's early stop)."""
        self.stop_reason = reason

    def model_state(self) -> dict[str, torch.Tensor]:
        """The student's whole state dict as plain tensors (gathered under FSDP: every rank calls it)."""
        if self._fsdp is not None:
            return fsdp.full_state(self._fsdp[0])[0]
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put :meth:`model_state`'s weights back (every rank, under FSDP)."""
        if self._fsdp is not None:
            fsdp.load_full_state(self._fsdp[0], state)
        else:
            self.model.load_state_dict(state)

    def _spent(self, step: int) -> bool:
        """The run ends here: its step budget is spent, or a callback asked it to stop."""
        return step >= self.total_steps or bool(self.stop_reason)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> torch.Tensor:
        order = self.order(epoch) if self.order else torch.randperm(len(self.x), generator=self.generator(1, epoch))
        if self.selector is not None:
            order = self.selector.epoch_rows(order, epoch, self.generator(5, epoch))
        return order

    def _labeled_rows(self, micro_index: int) -> torch.Tensor:
        """Rows of the cycled labeled stream for global micro-batch ``micro_index``."""
        lab = self.labeled_idx
        n, b = len(lab), self.cfg.labeled_batch_size
        start = micro_index * b
        out = []
        while len(out) < b:
            cycle, off = divmod(start + len(out), n)
            perm = torch.randperm(n, generator=self.generator(2, cycle))
            take = min(b - len(out), n - off)
            out.extend(lab[perm[off : off + take]].tolist())
        return torch.tensor(out, dtype=torch.long)

    def _micro_batch(self, order: torch.Tensor, epoch: int, micro: int) -> Batch:
        bs = self.candidates
        rows = order[micro * bs : (micro + 1) * bs]
        if self.labeled_idx is not None:
            rows = torch.cat([self._labeled_rows(epoch * self.steps_per_epoch * self.accumulate + micro), rows])
        rows = rows[self.rank :: self.world]  # each rank takes its shard of the global batch
        batch = self.task.batch(self, rows, epoch, micro)
        if self.selector is not None:
            self.selector.begin_micro(epoch, micro)
            keep_n = max(1, self.cfg.batch_size // self.world)
            batch = self.selector.timed_select(batch, self.model, keep_n)
        return batch

    # ------------------------------------------------------------------ state
    def _config_hash(self) -> str:
        # the device is not part of the recipe a resume must match (resume a CPU run on a GPU and back);
        # defaults of fields added later are left out, so checkpoints written before them still resume
        # (nor where metrics are also written: log_to changes no weight)
        parts = [self.cfg.model_dump(exclude={"device", "log_to"} | ({"dtype"} if self.cfg.dtype == "float32" else set())
                                     | ({"steps"} if self.cfg.steps is None else set())
                                     | {k for k in ("optimizer_state", "sparsity", "growth") if getattr(self.cfg, k) is None}),
                 self.seed, len(self.x), self.world]
        if self.selector is not None:  # a resume with another selector (or other selector settings) is refused
            parts.append(self.selector.spec())
        if self.strategy.spec() is not None:  # likewise another step strategy (backprop adds nothing: old hashes hold)
            parts.append(self.strategy.spec())
        if self.task.spec() is not None:  # and another task setting (e.g. the LM task's loss weights)
            parts.append(self.task.spec())
        blob = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _save(self, opt, step: int, epoch: int, micro: int, history: list, elapsed: float, seen: int) -> str | None:
        """Write the checkpoint of this step boundary (rank 0); returns its folder (None without a ckpt_dir)."""
        if self.ckpt_dir is None:
            return None
        folder = self.ckpt_dir / f"step-{step:08d}"
        if self._fsdp is not None:  # gathered on every rank (collective), written by rank 0 as for one process
            model_sd, objective_sd = fsdp.full_state(self._fsdp[0])
            opt_t, opt_meta = fsdp.optimizer_state(self._fsdp[0], opt)
        if self.rank == 0:
            if self._fsdp is None:
                model_sd, objective_sd = self.model.state_dict(), self.objective.state_dict()
                opt_t, opt_meta = optimizer_to_tensors(opt)
            tensors = {"model": model_sd, "objective": objective_sd, "optimizer": opt_t,
                       "selector": self.selector.state_tensors() if self.selector else {}}
            if self.callbacks:
                tensors["callbacks"] = {f"{i}/{k}": v for i, cb in enumerate(self.callbacks)
                                        for k, v in cb.state_tensors().items()}
            write_checkpoint(
                folder, tensors,
                {"kind": "train-state", "step": step, "epoch": epoch, "micro": micro, "history": history,
                 "optimizer": opt_meta, "config_hash": self._config_hash(), "elapsed": elapsed, "seen": seen,
                 "selector_stats": self.selector.stats if self.selector else {}, "stopped": self.stop_reason},
            )
            for old in sorted(self.ckpt_dir.glob("step-*"))[:-2]:  # keep the two newest
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self._saved_at = step
        return str(folder)

    def _stop_if_asked(self, opt, step: int, epoch: int, micro: int, history: list, t_start: float, seen: int) -> None:
        """SIGTERM or Ctrl-C arrived (see attar.lifecycle): write a checkpoint at this step boundary, then stop.

        Why here: between steps the model, optimiser and position in the data agree, so this checkpoint is as
        good as a periodic one and a resumed run ends with the same weights. Under DDP the ranks agree first
        (an inner run there leaves the decision to the run around it, which polls in step on every rank).
        """
        if self.inner and dist.world_size() > 1:
            return
        signum = lifecycle.stop_requested() or 0
        if self.world > 1:
            if not dist.any_rank(bool(signum)):
                return
            signum = signum or int(signal.SIGTERM)
        elif not signum:
            return
        folder = self.ckpt_dir / f"step-{step:08d}" if self.ckpt_dir else None
        if folder is not None and self._saved_at != step:
            self._save(opt, step, epoch, micro, history, time.perf_counter() - t_start, seen)
        raise lifecycle.RunInterrupted(signum, checkpoint=folder)

    def _unavailable(self, e: InputUnavailable, opt, step: int, epoch: int, micro: int, history: list,
                     t_start: float, seen: int) -> str:
        """Save the state at the start of step ``step`` (``micro``: its first micro-batch) and say where it is."""
        if self.ckpt_dir is None:
            return f"stage {self.name!r}: {e} Training stopped at step {step}; no checkpoint folder, nothing saved."
        folder = self.ckpt_dir / f"step-{step:08d}"
        if self._saved_at != step:
            self._save(opt, step, epoch, micro, history, time.perf_counter() - t_start, seen)
        return (f"stage {self.name!r}: {e} Training stopped at step {step} with a checkpoint ({folder}); resume the "
                "run (attar run --resume RUN) once it answers again.")

    def _load(self, opt) -> dict | None:
        ckpt = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        if self.world > 1:  # every rank resumes rank 0's choice (a lagging shared file system must not split them)
            ckpt = dist.broadcast_object(ckpt)
        if ckpt is None:
            return None
        tensors, state = read_checkpoint(ckpt)
        if state.get("config_hash") != self._config_hash() and not self.accept_changed_config:
            raise AttarError(
                f"{ckpt} was written with different training settings (or data, seed, world size); "
                "resume needs the same recipe. Start a fresh run or restore the original recipe."
            )
        if self._fsdp is not None:
            fsdp.load_full_state(self._fsdp[0], tensors["model"], tensors["objective"])
            fsdp.load_optimizer_state(self._fsdp[0], opt, tensors.get("optimizer", {}), state["optimizer"])
        else:
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
        saved = tensors.get("callbacks", {})
        for i, cb in enumerate(self.callbacks):
            cb.load_state_tensors({k.split("/", 1)[1]: v for k, v in saved.items() if k.split("/", 1)[0] == str(i)})
        self.stop_reason = state.get("stopped")  # a run a callback ended stays ended
        state["path"] = str(ckpt)
        self._saved_at = state["step"]
        return state

    def _diverged(self, lval: float, step: int, epoch: int, poisoned: str | None) -> str:
        """Drop the checkpoint whose very next loss was not finite; name the newest remaining one in words."""
        if poisoned is not None and self.rank == 0:
            shutil.rmtree(poisoned, ignore_errors=True)
        self._barrier()
        good = latest_checkpoint(self.ckpt_dir) if self.ckpt_dir else None
        if good is not None:
            where = (f"The last good checkpoint (its next loss was finite) is {good}; continue from it with a lower "
                     "train.lr or a train.grad_clip by resuming with the changed recipe and --allow-optim-change.")
        else:
            where = ("No checkpoint was written yet, so there is nothing to resume: start again with a lower "
                     "train.lr or a train.grad_clip.")
        return (f"stage {self.name!r}: the loss became {lval} at step {step} (epoch {epoch + 1}); training stopped. "
                f"{where} Also check the inputs for NaN/Inf.")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """The task's validation metrics (classification: accuracy and NLL on ``val``)."""
        return self.task.evaluate(self)

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainResult:
        if not self.inner:
            home = device_of(self.model)
            target = resolve_device(self.cfg.device)
            if target.type == "cpu":
                keep_freed_memory()  # a step's buffers reused by the next, not handed back and faulted in again
            if target.type == "cuda" and dist.world_size() > 1:
                target = torch.device("cuda", dist.local_rank())
            homes = [device_of(t) for t in self.teachers]
            self._move(target, [target] * len(self.teachers))
            try:
                res = self._fit(resume)
            finally:
                self._move(home, homes)
            res.model = res.model.to(home)
            return res
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):  # the run around an inner one keeps its own random stream
            return self._fit(resume)

    def _move(self, device: torch.device, teacher_devices: list[torch.device]) -> None:
        if device_of(self.model) != device:
            self.model.to(device)
            self.objective.to(device)
        for t, d in zip(self.teachers, teacher_devices):
            if device_of(t) != d:
                t.to(d)
        self.device = device

    def _fit(self, resume: bool) -> TrainResult:
        cfg = self.cfg
        teacher_mode = "none"
        if self.objective.needs_teacher:
            teacher_mode = getattr(self.teacher_cache, "mode", None) or f"live ({len(self.teachers)} teacher(s))"
        for t in self.teachers:
            t.eval()
            t.requires_grad_(False)
        self.device = device_of(self.model)
        self.objective.setup(self.model, self.teachers, self.num_classes or 0, len(self.x))
        step_mod = _Step(self.model, self.objective, self.task)
        self._fsdp = None
        if cfg.fsdp and self.world > 1 and not self.inner:
            self._fsdp = (step_mod, *fsdp.shard(step_mod, self.model, self.device))
        params = [p for p in step_mod.parameters() if p.requires_grad]
        opt = self.strategy.optimizer(cfg, params)
        runner: nn.Module = DDP(step_mod) if self.world > 1 and self._fsdp is None else step_mod

        step, epoch0, micro0, history, elapsed, seen = 0, 0, 0, [], 0.0, 0
        state = None
        # The step whose checkpoint exists, known alike on every rank: a rank that looked at the folder instead
        # could see rank 0's fresh write and skip the save (and its barrier) the other ranks are in.
        self._saved_at: int | None = None
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
        micro_per_epoch = self.steps_per_epoch * self.accumulate
        self.t_start = t_start
        show = False if self.inner or self.rank != 0 or self.progress is False else None
        with StepProgress(self.name, self.total_steps, completed=step, enabled=show) as bar, \
                lifecycle.graceful_stop():  # SIGTERM / Ctrl-C: stop at a step boundary below, with a checkpoint
            for epoch in range(epoch0, self.epochs):
                order = self._epoch_order(epoch)
                epoch_loss, epoch_n = 0.0, 0
                start_micro = micro0 if epoch == epoch0 else 0
                for micro in range(start_micro, micro_per_epoch):
                    if self._spent(step):
                        break
                    if micro % self.accumulate == 0:
                        seen_at_step = seen
                        torch.manual_seed(self.rng_seed(4, step))  # dropout etc.
                        lr = lr_at(step, self.total_steps, self.steps_per_epoch, cfg.lr, cfg.schedule,
                                   cfg.warmup_steps, cfg.step_every, cfg.step_gamma)
                        for g in opt.param_groups:
                            g["lr"] = lr
                        opt.zero_grad(set_to_none=True)
                    try:
                        batch, missing = self._micro_batch(order, epoch, micro), None
                    except InputUnavailable as e:
                        batch, missing = None, e
                    if self.world > 1 and getattr(self.task, "external_input", False) and \
                            dist.any_rank(missing is not None) and missing is None:
                        missing = InputUnavailable("another rank's input (a served teacher) did not answer.")
                    if missing is not None:
                        raise InputUnavailable(self._unavailable(missing, opt, step, epoch, micro - micro % self.accumulate,
                                                                 history, t_start, seen_at_step)) from None
                    losses, outputs = self.strategy.micro_step(self, runner, batch, opt, step)
                    lval = float(self.reduce(losses["loss"].detach()))
                    if not math.isfinite(lval):
                        raise TrainingDiverged(self._diverged(lval, step, epoch, pending))
                    pending = None  # the newest checkpoint's next loss was finite: it is good
                    for cb in self.callbacks:
                        cb.on_batch_end(self, batch, outputs, losses)
                    seen += len(batch.y) * self.world
                    epoch_loss += lval
                    epoch_n += 1
                    if (micro + 1) % self.accumulate != 0:
                        continue
                    self.strategy.update(self, opt, params)
                    step += 1
                    rate = seen / max(1e-9, time.perf_counter() - t_start)
                    bar.update(1, loss=lval, lr=lr, **{"samples/s": f"{rate:.0f}"})
                    if self.on_metrics and self.rank == 0 and (step % 10 == 0 or step == 1):
                        self.on_metrics(step, {f"train_{k}": float(v.detach()) for k, v in losses.items()}
                                        | {"lr": lr, "samples_per_s": rate})
                    for cb in self.callbacks:
                        cb.on_step_end(self, step)
                    end_of_epoch = micro + 1 == micro_per_epoch or self._spent(step)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not end_of_epoch:
                        pending = self._save(opt, step, epoch, micro + 1, history, time.perf_counter() - t_start, seen)
                        last_save = time.perf_counter()
                    if not end_of_epoch:
                        self._stop_if_asked(opt, step, epoch, micro + 1, history, t_start, seen)
                last_epoch = epoch + 1 == self.epochs or self._spent(step)
                self.objective.on_epoch_end(epoch, self.epochs)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch)
                rec = {"step": step, "epoch": epoch + 1, "train_loss": epoch_loss / max(1, epoch_n),
                       "seconds": time.perf_counter() - t_start}
                if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
                    rec |= self.evaluate()
                history.append(rec)
                if self.on_metrics and self.rank == 0:
                    self.on_metrics(step, {k: float(v) for k, v in rec.items() if k != "step"})
                # End-of-epoch checkpoints: the last epoch always; otherwise when checkpoint_every is unset and
                # at least 30 s have passed (many tiny epochs would otherwise spend their time in fsync).
                now = time.perf_counter()
                if last_epoch or (not cfg.checkpoint_every and now - last_save >= 30.0):
                    pending = self._save(opt, step, epoch + 1, 0, history, now - t_start, seen)
                    last_save = now
                if last_epoch:
                    break
                self._stop_if_asked(opt, step, epoch + 1, 0, history, t_start, seen)
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self._fsdp is not None:  # hand back an ordinary model with the trained weights
            self.model = fsdp.plain_copy(self._fsdp[1], self._fsdp[2], fsdp.full_state(self._fsdp[0])[0]).to(self.device)
            self._fsdp = None
        final = self.objective.finalize(self.model)
        seconds = time.perf_counter() - t_start
        selection = {}
        if self.selector is not None:  # selection vs training wall time: train_seconds is the rest of the run
            selection = dict(self.selector.stats)
            selection["train_seconds"] = max(0.0, seconds - float(selection.get("select_seconds", 0.0)))
        return TrainResult(model=final, history=history, steps=step, seconds=seconds,
                           teacher_mode=teacher_mode, samples_seen=seen, selection=selection)
