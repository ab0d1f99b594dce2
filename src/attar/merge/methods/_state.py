"""Small helpers for model-level methods that work on whole in-memory state dicts."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from attar.errors import AttarError
from attar.merge.methods.base import StateDict


def check_same_keys(state_dicts: Sequence[StateDict], what: str = "model") -> list[str]:
    """Names of the first state dict, after checking every other has the same names and shapes."""
    if not state_dicts:
        raise AttarError(f"no {what}s to merge: give at least one.")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(ref):
            missing = sorted(set(ref) - set(sd))[:3]
            extra = sorted(set(sd) - set(ref))[:3]
            raise AttarError(f"{what} {i} does not have the same tensors as {what} 0 (missing {missing}, extra {extra}).")
        for k in ref:
            if tuple(sd[k].shape) != tuple(ref[k].shape):
                raise AttarError(
                    f"tensor {k!r} has shape {tuple(sd[k].shape)} in {what} {i} but {tuple(ref[k].shape)} in {what} 0."
                )
    return list(ref)


def weighted_average(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None, normalize: bool = True) -> dict[str, torch.Tensor]:
    """Σ w_i θ_i (/ Σ w_i), float32 arithmetic, stored back in each tensor's dtype.

    Non-float tensors (counters, index buffers) are taken from the first model.
    """
    names = check_same_keys(state_dicts)
    w = [1.0] * len(state_dicts) if weights is None else [float(v) for v in weights]
    if len(w) != len(state_dicts):
        raise AttarError(f"got {len(w)} weights for {len(state_dicts)} models.")
    total = sum(w) if normalize else 1.0
    if normalize and abs(total) < 1e-12:
        raise AttarError("the weights sum to zero; cannot normalise.")
    out: dict[str, torch.Tensor] = {}
    for k in names:
        ref = state_dicts[0][k]
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for wi, sd in zip(w, state_dicts):
            acc.add_(sd[k].float(), alpha=wi)
        out[k] = (acc / total).to(ref.dtype)
    return out


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, an object with ``.logits`` (Hugging Face), or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if logits is None:
        raise AttarError("the model's output has no logits; this merge method needs a classifier (or LM) returning logits.")
    return logits
