"""The LM route's watcher: held-out perplexity, best weights and the teacher-hacking guard, as a Trainer callback.

Why a callback: the Trainer owns the loop, the checkpoints and resume; the monitor only looks at the model every
``eval_every`` steps and may end the run (``trainer.request_stop``). Its records and the best weights travel in
the Trainer's checkpoints, so an interrupted and resumed run records exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from torch import Tensor, nn

from attar.text.charlm import LMSplit
from attar.train.callbacks import Callback

__all__ = ["LMMonitor"]


class LMMonitor(Callback):
    """Every ``eval_every`` steps: held-out perplexity, the teacher's NLL of student samples (on-policy), the best
    weights kept, and the teacher-hacking guard (``lm.py``'s module doc). Its records, the best weights and the
    guard's counters are checkpointed with the run, so a resumed run records what an uninterrupted one does."""

    def __init__(self, eval_every: int, total_steps: int, val: LMSplit | None, monitor: LMSplit | None,
                 measure: Callable[[nn.Module], dict[str, float]], restore_best: bool, patience: int,
                 stop_on_hacking: bool, on_metrics: Callable[[int, dict], None] | None = None):
        self.eval_every, self.total_steps, self.val, self.monitor = eval_every, total_steps, val, monitor
        self.measure, self.restore_best, self.patience, self.stop_on_hacking = measure, restore_best, patience, stop_on_hacking
        self.on_metrics = on_metrics
        self.history: list[dict[str, Any]] = []
        self.best_ppl, self.best_step, self.best_state = float("inf"), 0, None
        self.rising, self.hacking, self.stopped, self.restored = 0, False, None, None
        self.last: dict[str, float] = {}

    def on_batch_end(self, trainer, batch, outputs, losses) -> None:
        self.last = {k: float(v.detach()) for k, v in losses.items()}

    def on_step_end(self, trainer, step: int) -> None:
        if step % self.eval_every and step != trainer.total_steps:
            return
        rec: dict[str, Any] = {"step": step, **self.last, "seconds": trainer.elapsed()}
        rec |= self.measure(trainer.model)
        self.history.append(rec)
        if self.on_metrics is not None and trainer.rank == 0:
            self.on_metrics(step, rec)
        if "val_ppl" not in rec:
            return
        if rec["val_ppl"] < self.best_ppl:
            self.best_ppl, self.best_step, self.rising = rec["val_ppl"], step, 0
            if self.restore_best:
                self.best_state = trainer.model_state()
        elif len(self.history) >= 2 and rec["val_ppl"] > self.history[-2].get("val_ppl", float("inf")):
            self.rising += 1
        else:
            self.rising = 0
        tn = [h["teacher_nll_of_samples"] for h in self.history[-(self.patience + 1):] if "teacher_nll_of_samples" in h]
        if self.rising >= self.patience and len(tn) == self.patience + 1 and tn[-1] < tn[0]:
            self.hacking = True
            if self.stop_on_hacking:
                self.stopped = step
                trainer.request_stop("teacher hacking suspected")

    def on_train_end(self, trainer) -> None:
        last = self.history[-1].get("val_ppl", self.best_ppl) if self.history else self.best_ppl
        if self.restore_best and self.best_state is not None and last > self.best_ppl:
            trainer.load_model_state(self.best_state)
            self.restored = self.best_step

    def state_tensors(self) -> dict[str, Tensor]:
        meta = {"history": self.history, "best_ppl": self.best_ppl if self.best_ppl < float("inf") else None,
                "best_step": self.best_step, "rising": self.rising, "hacking": self.hacking, "stopped": self.stopped}
        out = {"meta": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
        for k, v in (self.best_state or {}).items():
            out[f"best/{k}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "meta" not in tensors:
            return
        meta = json.loads(bytes(tensors["meta"].tolist()).decode())
        self.history = meta["history"]
        self.best_ppl = meta["best_ppl"] if meta["best_ppl"] is not None else float("inf")
        self.best_step, self.rising, self.hacking, self.stopped = meta["best_step"], meta["rising"], meta["hacking"], meta["stopped"]
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
        self.best_state = best or None
