"""How big and how fast a model is: the other half of every distillation result.

Latency is the median of many timed forward passes after a warm-up, under ``torch.inference_mode()``
in eval mode, on the model's own device, with random [0, 1] inputs. Why not one call or a few: the
first calls after a process starts (thread-pool start-up) or while another process holds a core can be
100x slower than the steady state (measured 120 ms vs 0.11 ms per call for a 5.8k-parameter ConvNet
here), so one timed call made two identical students differ by 200x in a report. The warm-up runs
for at least ``warmup_s`` seconds and 3 calls; then calls are timed for ``budget_s`` seconds (at least
``repeats``, at most ``max_repeats``), so fast models get hundreds of samples and slow ones a few.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(model: nn.Module, x: torch.Tensor) -> float:
    _sync(x.device)
    t = time.perf_counter()
    model(x)
    _sync(x.device)
    return time.perf_counter() - t


def _median_latency(model: nn.Module, x: torch.Tensor, repeats: int, budget_s: float, warmup_s: float,
                    max_repeats: int) -> float:
    t0 = time.perf_counter()
    calls = 0
    while True:  # warm-up: allocator, kernels, lazy init, the thread pool waking up
        _time_once(model, x)
        calls += 1
        spent = time.perf_counter() - t0
        if spent >= budget_s or (calls >= 3 and spent >= warmup_s):
            break
    times: list[float] = []
    t1 = time.perf_counter()
    while len(times) < repeats or (len(times) < max_repeats and time.perf_counter() - t1 < budget_s):
        times.append(_time_once(model, x))
    return statistics.median(times)


def model_size(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 3,
    budget_s: float = 0.3,
    warmup_s: float = 0.1,
    max_repeats: int = 200,
) -> dict[str, float | int]:
    """``params``, ``trainable_params``, ``bytes`` (parameters + buffers) and ``latency_ms_b{B}`` per batch size.

    ``latency_ms_b{B}``: the median of the calls timed during ``budget_s`` seconds (at least ``repeats``,
    at most ``max_repeats``) after a warm-up of at least 3 calls and ``warmup_s`` seconds (the warm-up
    stops after ``budget_s`` for a slow model). The model's train/eval mode is restored.
    """
    params = list(model.parameters())
    out: dict[str, float | int] = {
        "params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "bytes": sum(t.numel() * t.element_size() for t in list(params) + list(model.buffers())),
    }
    ref = params[0] if params else next(iter(model.buffers()), torch.empty(0))
    device, dtype = ref.device, ref.dtype if ref.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                x = torch.rand((int(bs), *map(int, input_shape)), device=device, dtype=dtype)
                med = _median_latency(model, x, max(1, int(repeats)), budget_s, warmup_s, max(1, int(max_repeats)))
                out[f"latency_ms_b{int(bs)}"] = 1000.0 * med
    finally:
        model.train(was_training)
    return out
