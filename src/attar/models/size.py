"""How big and how fast a model is: the other half of every distillation result.

Latency is the median of a few timed forward passes after a warm-up, under
``torch.inference_mode()`` in eval mode, on the model's own device, with random
[0, 1] inputs. Repeats shrink for slow models so a report stays quick.
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


def model_size(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 5,
    budget_s: float = 1.0,
) -> dict[str, float | int]:
    """``params``, ``trainable_params``, ``bytes`` (parameters + buffers) and ``latency_ms_b{B}`` per batch size.

    ``repeats`` timed runs per batch size (fewer if one run exceeds
    ``budget_s / repeats``; at least one). The model's train/eval mode is restored.
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
                first = _time_once(model, x)  # warm-up (allocator, kernels, lazy init)
                n = max(1, min(int(repeats), int(budget_s / max(first, 1e-6))))
                times = [_time_once(model, x) for _ in range(n)]
                out[f"latency_ms_b{int(bs)}"] = 1000.0 * statistics.median(times)
    finally:
        model.train(was_training)
    return out
