"""How much memory an LM training run needs, estimated before the first step, and a refusal that names the fix.

Why: a run that does not fit dies minutes in (or takes the machine down with it) with an allocator's message. The
estimate adds the parts a user can act on: the weights of every model in float32, the student's gradients and
AdamW's two moments for the trainable parameters, the activations kept for the backward pass (a rule of thumb of
about 16 float32 values per token, hidden unit and layer; 2 with gradient checkpointing), and the logits (one
chunk of positions at a time with chunking, else the whole batch of both models). It counts tensors only, not
the Python and torch runtime or the allocator's slack, so it is meant to catch runs that are off by a factor, not
to budget the last gigabyte: ``bench/lm_step_perf.py`` prints it beside the measured peak (which was about 1.4×
the estimate on SmolLM2 on a CPU).
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attar.distill.lm_task import auto_chunk
from attar.errors import AttarError

__all__ = ["estimate_lm_memory", "available_bytes", "check_fits"]

GiB = 2**30


def _shape(model: nn.Module) -> tuple[int, int, int]:
    """(hidden size, layers, vocabulary) from a Hugging Face config (0 where unknown)."""
    cfg = getattr(model, "config", None)
    get = lambda *names: next((int(getattr(cfg, n)) for n in names if isinstance(getattr(cfg, n, None), int)), 0)  # noqa: E731
    return get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer"), get("vocab_size")


def estimate_lm_memory(student: nn.Module, teacher: nn.Module | None, *, batch_size: int, length: int,
                       chunk_tokens: int | None, gradient_checkpointing: bool = False) -> dict[str, int]:
    """Bytes per part (``weights``, ``optimizer``, ``activations``, ``logits``) and their ``total``."""
    params = sum(p.numel() for p in student.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    t_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    hidden, layers, vocab = _shape(student)
    tokens = batch_size * length
    per_value = 2 if gradient_checkpointing else 16
    # per position: the student's logits, their softmax and gradient (3), the teacher's logits and softmax (2)
    chunk = auto_chunk(vocab, chunk_tokens, tokens)
    logits = min(chunk, tokens) * max(vocab, 1) * 4 * (3 + (2 if teacher is not None else 0))
    parts = {"weights": 4 * (params + t_params), "optimizer": 12 * trainable,
             "activations": tokens * hidden * layers * 4 * per_value, "logits": logits}
    parts["total"] = sum(parts.values())
    return parts


def _release_freed_memory() -> None:
    """Hand memory this process has freed back to the system before reading MemAvailable.

    Why: after one model trains in a process (a notebook, a bench, a recipe with several lm stages), its tensors
    are freed but glibc keeps much of that memory in its heap, where MemAvailable does not count it; the next
    check would refuse a run that fits. ``malloc_trim(0)`` returns it (glibc only; elsewhere nothing happens)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the run trains: CUDA's free bytes, or the machine's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    _release_freed_memory()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(parts: dict[str, int], device: torch.device, already_loaded: bool = True, where: str = "") -> None:
    """Refuse a run whose estimate exceeds the free memory, with the estimate and the fixes."""
    free = available_bytes(device)
    if free is None:
        return
    need = parts["total"] - (parts["weights"] if already_loaded and device.type == "cpu" else 0)
    if need <= free:
        return
    shown = ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if k != "total")
    raise AttarError(
        f"{where}this run needs about {parts['total'] / GiB:.1f} GiB ({shown} GiB) but {free / GiB:.1f} GiB are free "
        f"on {device}. Fixes: lower train.batch_size or data.max_len (activations and logits), set "
        "train.gradient_checkpointing: true (activations), leave train.chunk_tokens automatic (logits), train LoRA "
        "adapters with lora: {rank: 8} (optimizer state), or read the teacher from cache_topk instead of running it.")


def describe(parts: dict[str, Any]) -> str:
    """``total 2.45 GiB, weights 0.80 GiB, ...``: an estimate as one line for logs."""
    return ", ".join(f"{k} {parts[k] / GiB:.2f} GiB" for k in ("total", *(k for k in parts if k != "total")))
