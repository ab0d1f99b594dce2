"""Logit-level fusion: combine models' log-probabilities at inference, no weights merged.

Emulated fine-tuning (EFT, Mitchell et al. 2024, "An Emulator for Fine-Tuning
Large Language Models using Small Language Models") samples from::

    log p_eft(y|x) = log p_large-base(y|x) + β · [log p_small-ft(y|x) − log p_small-base(y|x)] − log Z(x)

i.e. the large pre-trained model plus the *behaviour change* fine-tuning caused
in a small model ("up-scaling"). β = 1 is the paper's emulator; β = 0 is the
large base alone. The models may have different sizes and architectures; they
only need the same label set (vocabulary). ``LogitArithmetic`` is the general
form Σ wᵢ log pᵢ, renormalised; EFT is weights (1, β, −β).

Both return **normalised log-probabilities** (use ``.exp()`` for probabilities,
``argmax`` for a prediction); they run under ``torch.no_grad`` with the members
in eval mode. For Hugging Face language models the arguments of ``forward``
are passed to every member (so they must share a tokenizer) and the result has
the shape of their ``logits`` ([batch, tokens, vocabulary]).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attar.errors import AttarError
from attar.merge.test_time import _logits


def fuse_log_probs(logits: Sequence[torch.Tensor], weights: Sequence[float], temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(Σ wᵢ · log_softmax(logitsᵢ / T)) over the last dimension, in float32."""
    if len(logits) != len(weights) or not logits:
        raise AttarError(f"got {len(logits)} outputs and {len(weights)} weights; give one weight per model.")
    shape = logits[0].shape
    for i, z in enumerate(logits[1:], start=1):
        if z.shape != shape:
            what = "vocabulary" if z.dim() == 3 else "label set"
            raise AttarError(
                f"model {i} returns outputs of shape {tuple(z.shape)} but model 0 {tuple(shape)}: logit fusion needs "
                f"every model to share the {what} (same classes in the same order, or the same tokenizer)."
            )
    total = sum(float(w) * F.log_softmax(z.float() / temperature, dim=-1) for w, z in zip(weights, logits))
    return F.log_softmax(total, dim=-1)


def eft_log_probs(
    large_base: torch.Tensor, small_fine_tuned: torch.Tensor, small_base: torch.Tensor, *, beta: float = 1.0, temperature: float = 1.0
) -> torch.Tensor:
    """EFT up-scaling from the three models' logits: large base + β·(small fine-tuned − small base), renormalised."""
    return fuse_log_probs([large_base, small_fine_tuned, small_base], [1.0, beta, -beta], temperature)


class LogitArithmetic(nn.Module):
    """``forward(*args) = log_softmax(Σ wᵢ · log_softmax(modelᵢ(*args) / T))``: a product of experts with signed exponents."""

    def __init__(self, models: Sequence[nn.Module], weights: Sequence[float], *, temperature: float = 1.0):
        super().__init__()
        if len(models) != len(weights) or not models:
            raise AttarError(f"got {len(models)} models and {len(weights)} weights; give one weight per model.")
        if temperature <= 0:
            raise AttarError(f"temperature must be > 0, got {temperature}.")
        self.members = nn.ModuleList(models)
        self.weights = [float(w) for w in weights]
        self.temperature = float(temperature)

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        modes = [m.training for m in self.members]
        try:
            outs = []
            for m in self.members:
                m.eval()
                outs.append(_logits(m(*args, **kwargs)))
            return fuse_log_probs(outs, self.weights, self.temperature)
        finally:
            for m, was in zip(self.members, modes):
                m.train(was)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, temperature={self.temperature}"


class EmulatedFineTune(LogitArithmetic):
    """EFT up-scaling: ``large_base`` + β · (``small_fine_tuned`` − ``small_base``) in log-probability space.

    Swap the roles (small base + β·(large fine-tuned − large base)) for EFT's
    "down-scaling" experiment; the arithmetic is the same.
    """

    def __init__(self, large_base: nn.Module, small_fine_tuned: nn.Module, small_base: nn.Module, *, beta: float = 1.0, temperature: float = 1.0):
        super().__init__([large_base, small_fine_tuned, small_base], [1.0, beta, -beta], temperature=temperature)
        self.beta = float(beta)
