"""UDS: utility-diversity sampling (Zou et al., "Utility-Diversity Aware Online Batch Selection for LLM
Supervised Fine-tuning", 2025), adapted to classification.

In the paper each candidate sequence has a logits matrix ``L_i`` (tokens x vocabulary); its nuclear norm
``||L_i||_*`` scores *utility and intra-sample diversity* at once (large when the rows are large and point
in many directions). *Inter-sample diversity* is the mean distance between a low-dimensional random
projection of ``L_i`` and a FIFO memory buffer of the projections of previously selected samples. The top
``keep`` fraction by ``utility + weight * diversity`` is trained on. No reference model, no validation
set, no extra backward: one no-grad forward over the candidates.

A classifier gives one logit *vector* per image, whose nuclear norm is just its length, so the matrix has
to come from somewhere. Two adaptations (``intra``):

* ``contribution`` (default, free): treat the candidate batch's logits ``Z`` (candidates x classes, rows
  centred so softmax's free shift does not count) as the matrix and give each row its *share* of the
  nuclear norm, ``u_i = z_i^T (Z^T Z)^(-1/2) z_i``: the shares add up to ``||Z||_*`` exactly, and ``u_i / 2``
  is the derivative of ``||Z||_*`` with respect to the row's weight. A row with large logits in a direction
  the other candidates do not cover scores high (alone in its direction it gets its full length); rows
  redundant with many others share one direction and score low. One ``C x C`` eigendecomposition and
  ``O(n C^2)`` per step (logits wider than 256 classes are first randomly projected to 256 dimensions).
* ``views``: the per-sample matrix is the sample's logits under ``views`` deterministic views of the image
  (the identity and 1-pixel shifts), ``views x C``, and ``u_i = ||L_i||_*`` as in the paper: large logits
  plus disagreement between views. Costs ``views`` scoring forwards per candidate (counted).

Inter-sample diversity: embeddings are a fixed Gaussian random projection of the centred logits to
``embed_dim`` dimensions (seeded from the stage seed); ``d_i`` is the mean Euclidean distance to the
``buffer`` most recently selected embeddings (zero while the buffer is empty). Both terms are divided by
their mean over the candidates before mixing, so ``weight`` is scale-free (the paper's ``alpha`` is in raw
units). The buffer is checkpointed (``state_tensors``), so resume is exact. Under DDP each rank keeps its
own buffer and only rank 0's is checkpointed, so multi-process resume of UDS is not bit-exact.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.errors import AttarError
from attar.train.objective import Batch
from attar.select.base import SELECTORS, Selector, SelectorParams
from attar.rng import generator as generator_for

_MAX_GRAM = 256  # logits wider than this are randomly projected first (one c x c eigh per step)

# (dy, dx) shifts of the views after the identity
_SHIFTS = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)]


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate a batch [N, C, H, W] by (dy, dx) pixels, zeros shifted in."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    return p[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def nuclear_shares(z: torch.Tensor) -> torch.Tensor:
    """Each row's share of the nuclear norm of ``z`` [n, c]: ``u_i = z_i^T (Z^T Z)^(-1/2) z_i``.

    The shares add up to ``||Z||_*`` exactly (``sum_i u_i = tr(G^(-1/2) G) = tr(G^(1/2))``), and ``u_i / 2``
    is the derivative of ``||Z||_*`` with respect to row i's weight (``Z -> diag(sqrt(w)) Z`` at ``w = 1``).
    A row alone in its direction gets its full length ``||z_i||``; ``k`` equal rows share ``sqrt(k) ||z||``.
    One ``c x c`` eigendecomposition plus ``O(n c^2)``: no per-row decomposition, no Python loop.
    Directions the batch does not span (zero eigenvalues) contribute nothing."""
    z = z.double()
    lam, v = torch.linalg.eigh(z.T @ z)
    tol = lam.max().clamp(min=0) * 1e-10 + 1e-30
    inv_sqrt = torch.where(lam > tol, lam.clamp(min=tol).rsqrt(), torch.zeros_like(lam))
    w = z @ v  # coordinates in the eigenbasis
    return ((w * w) * inv_sqrt).sum(1).float()


class UDSParams(SelectorParams):
    keep: float = Field(0.5, gt=0, le=1, description="fraction of candidate rows trained on")
    weight: float = Field(1.0, ge=0, description="weight of inter-sample diversity (both terms mean-normalised)")
    buffer: int = Field(1024, ge=1, description="memory buffer size (embeddings of recently selected rows)")
    embed_dim: int = Field(16, ge=1, description="dimension of the random projection of the logits")
    intra: Literal["contribution", "views"] = Field(
        "contribution", description="per-sample matrix: contribution to the batch's nuclear norm, or logits over views")
    views: int = Field(3, ge=2, le=1 + len(_SHIFTS), description="views per sample when intra=views")
    signal: Literal["logits", "error"] = Field(
        "logits", description="matrix entries: the logits (the paper; label-free) or softmax - onehot(label)")


@SELECTORS.register("uds")
class UDS(Selector):
    """Utility (nuclear norm) + inter-sample diversity (distance to a memory buffer)."""

    Params = UDSParams
    scores_with_model = True

    def __init__(self, params: UDSParams):
        super().__init__(params)
        self.buffer = torch.zeros(params.buffer, params.embed_dim)
        self.count = 0
        self.ptr = 0
        self._proj: dict[tuple[int, int], torch.Tensor] = {}

    def candidates(self, batch_size: int) -> int:
        return max(batch_size, math.ceil(batch_size / self.p.keep))

    def check(self, *, stage=None, objective=None, input_shape=None, labels=None) -> None:
        if self.p.intra == "views" and input_shape is not None and len(input_shape) != 3:
            raise AttarError(f"intra: selector 'uds' with intra: views shifts images (channels, height, width); the "
                             f"stage's inputs have shape {tuple(input_shape)}. Use intra: contribution (choices: "
                             "contribution, views) for non-image data.")

    # -- scoring -----------------------------------------------------------------------------
    def score(self, batch: Batch, model) -> torch.Tensor:
        if self.p.intra != "views":
            return super().score(batch, model)
        if batch.x.dim() != 4:
            raise AttarError(f"selector 'uds' with intra: views shifts images [N, C, H, W]; got inputs of shape "
                             f"{tuple(batch.x.shape)}. Use intra: contribution for non-image data.")
        xs = [batch.x] + [shift(batch.x, dy, dx) for dy, dx in _SHIFTS[: self.p.views - 1]]
        stacked = Batch(x=torch.cat(xs), y=batch.y.repeat(len(xs)), idx=batch.idx.repeat(len(xs)))
        return super().score(stacked, model).view(len(xs), len(batch.y), -1)  # [V, n, C]

    def projection(self, c: int, d: int, device: torch.device) -> torch.Tensor:
        if (c, d) not in self._proj:
            g = generator_for(self.seed, "uds-projection", c, d)
            self._proj[(c, d)] = torch.randn(c, d, generator=g) / math.sqrt(d)
        return self._proj[(c, d)].to(device)

    def signal(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the matrices are made of: centred logits, or the CE gradient ``softmax - onehot(y)``
        (zero for unlabeled rows)."""
        z = logits.float()
        if self.p.signal == "error":
            onehot = F.one_hot(y.clamp(min=0), z.shape[-1]).float() * (y >= 0).float().unsqueeze(-1)
            return torch.softmax(z, -1) - onehot
        return z - z.mean(-1, keepdim=True)

    def utility(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 3:  # [V, n, C]: nuclear norm of each sample's views x classes matrix
            return torch.linalg.svdvals(z.transpose(0, 1)).sum(-1)
        if z.shape[1] > _MAX_GRAM:
            z = z @ self.projection(z.shape[1], _MAX_GRAM, z.device)
        return nuclear_shares(z)

    def diversity(self, emb: torch.Tensor) -> torch.Tensor:
        if self.count == 0:
            return torch.zeros(len(emb), device=emb.device)
        return torch.cdist(emb, self.buffer[: self.count].to(emb.device)).mean(1)

    def scores(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combined score per candidate and the candidates' embeddings."""
        z = self.signal(logits, y)
        u = self.utility(z)
        base = z[0] if z.dim() == 3 else z
        emb = base @ self.projection(base.shape[1], self.p.embed_dim, base.device)
        d = self.diversity(emb)
        s = u / u.mean().clamp(min=1e-12)
        if self.p.weight > 0 and self.count > 0:
            s = s + self.p.weight * d / d.mean().clamp(min=1e-12)
        return s, emb

    def select(self, batch: Batch, logits: torch.Tensor | None, keep_n: int) -> torch.Tensor:
        assert logits is not None
        n = len(batch.y)
        s, emb = self.scores(logits, batch.y)
        pos = torch.arange(n) if keep_n >= n else torch.topk(s, keep_n, sorted=False).indices.sort().values
        self.push(emb[pos])
        return pos

    # -- memory buffer -------------------------------------------------------------------------
    def push(self, emb: torch.Tensor) -> None:
        """FIFO write of the selected rows' embeddings (the newest ``buffer`` rows are kept)."""
        m = len(self.buffer)
        emb = emb[-m:].detach().to(self.buffer.dtype).cpu()
        idx = (self.ptr + torch.arange(len(emb))) % m
        self.buffer[idx] = emb
        self.ptr = int((self.ptr + len(emb)) % m)
        self.count = min(m, self.count + len(emb))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"buffer": self.buffer.clone(), "count_ptr": torch.tensor([self.count, self.ptr], dtype=torch.int64)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "buffer" in tensors:
            self.buffer = tensors["buffer"].clone().float()
            self.count, self.ptr = (int(v) for v in tensors["count_ptr"])
