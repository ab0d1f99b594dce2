"""Learning rate as a pure function of the step, so resume needs no scheduler state."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, steps_per_epoch: int, base_lr: float, schedule: str,
          warmup_steps: int = 0, step_every: int = 1, step_gamma: float = 0.1) -> float:
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        return base_lr * step_gamma ** (step // max(1, step_every * steps_per_epoch))
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
