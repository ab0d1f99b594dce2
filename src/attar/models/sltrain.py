"""SLTrain (Han et al. 2024): each weight matrix as ``W = B A + S``, low rank plus sparse on a fixed random support.

Why: ``B`` (m x r), ``A`` (r x n) and the ``nnz`` values of ``S`` are the only trained numbers, so weights, gradients
and optimizer state shrink from ``m n`` to ``r (m + n) + nnz`` (plus the support's int32 indices, a buffer); the
sparse part restores the full rank a pure low-rank model lacks. The support is drawn once, uniformly at random,
and never changes (it is a buffer, saved with the weights, so a reloaded model has the same one).

It is applied with ``torch.nn.utils.parametrize``: a layer's ``weight`` becomes the parametrization's output, so the
layer's own forward (Linear, Conv2d, GPT-2's Conv1D, ...) is unchanged; any weight of 2+ dimensions is an
``out x rest`` matrix. ``sparsity`` is the fraction of S's entries that are zero (the paper's delta = 0.03 of
non-zeros is ``sparsity: 0.97``). Initialisation (attar's choice): S takes the dense layer's initial values on its
support, and B A is a random product of the dense initial weights' standard deviation. The dense product is
materialised in every forward, as in the paper's reference code: the saving is in what is stored and trained, not
in the forward's working memory.
"""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from attar.errors import AttarError


class SparsePlusLowRank(nn.Module):
    """The parametrization: ``(B, A, values) -> B @ A + S`` reshaped to the layer's weight shape."""

    def __init__(self, shape: torch.Size, rank: int, sparsity: float):
        super().__init__()
        self.shape, self.rank = tuple(shape), rank
        m, n = shape[0], math.prod(shape[1:])
        nnz = max(1, round((1 - sparsity) * m * n))
        self.register_buffer("support", torch.randperm(m * n)[:nnz].sort().values.to(torch.int32))

    def forward(self, b: torch.Tensor, a: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (b @ a).reshape(-1).index_add(0, self.support, values).view(self.shape)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors a dense initial ``w`` starts from (called once, when the layer is converted)."""
        m, n = self.shape[0], w.numel() // self.shape[0]
        std = float(w.std()) if w.numel() > 1 else 1.0
        each = (std / math.sqrt(self.rank)) ** 0.5  # var(B A) = rank * var(B) var(A) = std^2
        b = torch.randn(m, self.rank, dtype=w.dtype, device=w.device) * each
        a = torch.randn(self.rank, n, dtype=w.dtype, device=w.device) * each
        values = w.reshape(-1)[self.support.long()].clone()
        return b, a, values


def _layers(model: nn.Module, rank: int, exclude: list[str]):
    # an output head tied to the input embedding (GPT-2's lm_head) is the embedding: it stays dense and tied
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2 or isinstance(mod, nn.Embedding) or id(w) in embeddings:
            continue
        if any(fnmatch(name, pat) for pat in exclude) or parametrize.is_parametrized(mod, "weight"):
            continue
        if rank >= min(w.shape[0], w.numel() // w.shape[0]):
            continue  # low rank would be full rank: the layer stays dense
        yield name, mod


def apply_sltrain(model: nn.Module, rank: int, sparsity: float, exclude: list[str] = ()) -> list[str]:
    """Turn every weight matrix of ``model`` with both sides larger than ``rank`` (not an embedding, not matching an
    ``exclude`` glob) into ``B A + S``; returns the converted layers' names."""
    if not 0.0 <= sparsity < 1.0:
        raise AttarError(f"model.parameterization.sltrain.sparsity must be in [0, 1), got {sparsity}.")
    done = []
    for name, mod in list(_layers(model, rank, list(exclude))):
        parametrize.register_parametrization(mod, "weight", SparsePlusLowRank(mod.weight.shape, rank, sparsity),
                                             unsafe=True)
        done.append(name)
    if not done:
        raise AttarError(f"model.parameterization.sltrain: no weight matrix has both sides larger than rank {rank}; "
                         "lower the rank.")
    return done


def materialize(model: nn.Module) -> nn.Module:
    """Replace every ``B A + S`` weight by its dense value, in place (for formats that know only plain weights, e.g.
    a Hugging Face folder); returns ``model``."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight") and any(
                isinstance(p, SparsePlusLowRank) for p in mod.parametrizations["weight"]):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model


def supports(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each converted layer's support (flat indices of S's non-zeros), by layer name."""
    return {n.removesuffix(".parametrizations.weight.0"): m.support for n, m in model.named_modules()
            if isinstance(m, SparsePlusLowRank)}


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Measured bytes: trained parameters, and the support indices (buffers) SLTrain adds."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    support = sum(s.numel() * s.element_size() for s in supports(model).values())
    return {"parameters": params, "support": support}
