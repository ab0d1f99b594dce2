"""Row chunking for big CPU forwards: the same values, without the page faults of huge activations.

On a CPU a ConvNet-128 forward over thousands of 28x28 rows spends much of its time in the
kernel, not in arithmetic: each activation (``rows x 128 x 32 x 32`` floats, 1.4 GB for DM's
2,660 rows, 134 MB for one class of 256) is above glibc's mmap threshold (dynamic, at most 32 MB),
so every one is a fresh mapping whose pages are faulted in and zeroed on first touch, then
unmapped when freed. Put through 32 rows at a time (16.8 MB per activation) the freed blocks are
reused: DM's real-batch embedding measured 2-2.6x faster than in one call, a 256-row gradient
1.8-1.9x, and system time went from about half of the CPU time to none (one thread, Fashion-MNIST;
``bench/condense_vs_reference.py --sweep``, table in docs/benchmarks.md). Raising glibc's
``MALLOC_MMAP_THRESHOLD_`` instead removes the faults for any code, the reference's too: then
256-row and 32-row calls take the same time.

Only for networks whose rows do not interact: a BatchNorm layer in training mode normalises by
the statistics of the whole batch, so a network with one is never chunked (:func:`cpu_rows`
returns ``None``). Dropout, where a model has it, draws other masks chunk by chunk than in one call
(the same distribution, not the same draw). On GPUs the whole batch goes at once (they want large batches).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

#: rows per forward on CPU: ConvNet-128 activations of 32 rows stay under glibc's 32 MB mmap cap (64 rows do not)
CPU_ROWS = 32


def cpu_rows(net: nn.Module, device: torch.device | str) -> int | None:
    """Rows per chunk for ``net`` on ``device``: :data:`CPU_ROWS` on CPU, ``None`` (whole batch) on
    other devices or when ``net`` holds a BatchNorm layer (its batch statistics couple the rows)."""
    if torch.device(device).type != "cpu":
        return None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return None
    return CPU_ROWS


def forward_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int | None) -> torch.Tensor:
    """``fn(x)`` computed ``rows`` rows at a time and concatenated (``rows=None``: one call). Under autograd
    each chunk keeps its own graph (the same saved activations in all), and the backward pass also goes
    chunk by chunk (smaller temporaries), so it helps there too."""
    if rows is None or len(x) <= rows:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(rows)])


def mean_loss_grads(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, params: list[torch.Tensor], rows: int | None) -> tuple[torch.Tensor, ...]:
    """Gradients of ``loss_fn(x, y)`` (a mean over rows) with respect to ``params``, accumulated over
    chunks of ``rows`` rows, each weighted by its share of rows (equal to one call up to float rounding).
    No graph is kept (for real batches, whose gradients are targets)."""
    if rows is None or len(x) <= rows:
        return torch.autograd.grad(loss_fn(x, y), params)
    total: list[torch.Tensor] | None = None
    for xc, yc in zip(x.split(rows), y.split(rows)):
        gs = torch.autograd.grad(loss_fn(xc, yc) * (len(xc) / len(x)), params)
        total = list(gs) if total is None else [t.add_(g) for t, g in zip(total, gs)]
    return tuple(total)


def backward_rows(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                  rows: int | None) -> None:
    """``loss_fn(x, y).backward()`` (a mean over rows) accumulated chunk by chunk into ``.grad``."""
    if rows is None or len(x) <= rows:
        loss_fn(x, y).backward()
        return
    for xc, yc in zip(x.split(rows), y.split(rows)):
        (loss_fn(xc, yc) * (len(xc) / len(x))).backward()
