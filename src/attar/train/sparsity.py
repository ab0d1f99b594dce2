"""SPDF (Thangarasa et al. 2023): sparse pre-training, dense fine-tuning, as a callback the Trainer adds itself.

Why: a fixed random ``sparsity`` fraction of every weight matrix is held at exactly zero for the first
``dense_from`` optimizer steps (the paper's 75% cuts pre-training FLOPs on hardware that skips zeros), then every
weight trains. "Exactly zero" is kept two ways: the masked gradients are zeroed after each micro-batch's backward
(so AdamW's moments of masked weights stay zero and its weight decay has nothing to shrink) and the weights are
multiplied by the mask after each step (a guard; with zero gradients and zero moments the update is already 0).
On a dense CPU this saves no time or memory: the zeros are stored and multiplied like any other value.

The masks are a function of ``(seed, parameter index)``, so a resumed run rebuilds the same ones; only the step
count travels in the checkpoint. Matrices (two or more dimensions) are masked, except embeddings and names matching
``exclude``.
"""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn

from attar import rng
from attar.train.callbacks import Callback
from attar.train.config import SparsityConfig

_PURPOSE = 1515  # rng purpose of the masks


def masked_parameters(model: nn.Module, exclude: list[str]) -> list[tuple[str, nn.Parameter]]:
    """The matrices SPDF masks: every parameter of 2+ dimensions outside embeddings and ``exclude`` globs."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(n, p) for n, p in model.named_parameters()
            if p.dim() >= 2 and id(p) not in skip and not any(fnmatch(n, pat) for pat in exclude)]


def random_mask(shape: torch.Size, sparsity: float, g: torch.Generator) -> torch.Tensor:
    """A {0, 1} float mask with exactly ``round(sparsity * numel)`` zeros at uniformly random positions."""
    n = shape.numel()
    mask = torch.ones(n)
    mask[torch.randperm(n, generator=g)[: round(sparsity * n)]] = 0.0
    return mask.view(shape)


class SPDF(Callback):
    """Holds the masked weights of ``model`` at zero until step ``dense_from`` (0-based), then lets them train."""

    def __init__(self, model: nn.Module, cfg: SparsityConfig, seed: int):
        self.cfg, self.step = cfg, 0
        self.params = masked_parameters(model, cfg.exclude)
        self.masks = [random_mask(p.shape, cfg.sparsity, rng.generator(seed, _PURPOSE, i))
                      for i, (_, p) in enumerate(self.params)]
        self._apply_to_weights()  # the run starts sparse (a resumed run's weights are already)

    @property
    def sparse(self) -> bool:
        return self.step < self.cfg.dense_from

    def _mask(self, i: int, like: torch.Tensor) -> torch.Tensor:
        if self.masks[i].device != like.device or self.masks[i].dtype != like.dtype:
            self.masks[i] = self.masks[i].to(like.device, like.dtype)
        return self.masks[i]

    @torch.no_grad()
    def _apply_to_weights(self) -> None:
        if self.sparse:
            for i, (_, p) in enumerate(self.params):
                p.mul_(self._mask(i, p))

    @torch.no_grad()
    def on_batch_end(self, trainer, batch, outputs, losses) -> None:
        if self.sparse:
            for i, (_, p) in enumerate(self.params):
                if p.grad is not None:
                    p.grad.mul_(self._mask(i, p.grad))

    def on_step_end(self, trainer, step: int) -> None:
        self._apply_to_weights()  # still within the sparse phase: the step just taken was a sparse one
        self.step = step

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "step" in tensors:
            self.step = int(tensors["step"])

    def density(self) -> float:
        """Fraction of non-zero entries over the masked matrices now (1 - sparsity while sparse)."""
        nz = sum(int((p != 0).sum()) for _, p in self.params)
        return nz / max(1, sum(p.numel() for _, p in self.params))
