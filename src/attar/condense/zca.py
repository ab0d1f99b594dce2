"""ZCA whitening for condensation (the ``zca`` plug-in of :func:`attar.condense.condense`).

As in the MTT/KIP reference code (``kornia.enhance.ZCAWhitening(eps=0.1)`` after per-channel
standardisation): the training images are standardised with the data set's per-channel mean and
std, flattened to ``D = C·H·W`` vectors, centred, and multiplied by

    W = U diag(1 / sqrt(λ + eps)) Uᵀ        (U, λ: eigen-decomposition of the D×D covariance)

so that the whitened data has (nearly, for small ``eps``) identity covariance while staying as close
as possible to the original images. ``eps`` regularises the small eigenvalues (pixels are strongly
correlated, so the unregularised transform would amplify noise). The inverse
``U diag(sqrt(λ + eps)) Uᵀ`` is exact, so a whitened image maps back to the very same pixels.

How condensation uses it (the design choice, see docs/condense.md): the method runs entirely in
ZCA space (real rows whitened, networks built without input normalisation, expert trajectories of
MTT trained in that space), and the learned images are mapped back with :meth:`ZCA.unwhiten` before
the artifact is written. The artifact therefore holds ordinary pixel-space images like every other
method's, readable by every later stage; its metadata records ``zca: {eps, dim}``. The transform
itself is not stored (it is a deterministic function of the source data and ``eps``:
``ZCA.fit`` on the recorded data spec rebuilds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attar.errors import AttarError

#: the largest flattened image size (C·H·W) whitened; the D×D eigen-decomposition grows as D³
MAX_DIM = 12288


@dataclass
class ZCA:
    """A fitted whitening: ``whiten(x) = ((x − m)/s − mu) @ W``, ``unwhiten`` its exact inverse."""

    mean: torch.Tensor  # per-channel standardisation mean [1, C, 1, 1]
    std: torch.Tensor  # per-channel std [1, C, 1, 1]
    mu: torch.Tensor  # [D] mean of the standardised, flattened training images
    w: torch.Tensor  # [D, D] whitening matrix (symmetric)
    w_inv: torch.Tensor  # [D, D] its inverse
    eps: float

    @classmethod
    def fit(cls, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 0.1,
            chunk: int = 8192) -> "ZCA":
        """Fit on images ``x`` [N, C, H, W] in [0, 1] scale (``mean``/``std``: the data set's per-channel stats)."""
        if x.dim() != 4:
            raise AttarError(f"ZCA whitening needs image data [N, C, H, W]; got shape {tuple(x.shape)}.")
        if not eps > 0:
            raise AttarError(f"ZCA eps must be > 0 (it regularises small eigenvalues), got {eps!r}.")
        d = int(x[0].numel())
        if d > MAX_DIM:
            raise AttarError(
                f"ZCA whitening of {tuple(x.shape[1:])} images needs a {d}x{d} eigen-decomposition (limit {MAX_DIM}); "
                "use smaller images or condense without zca."
            )
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        n = x.shape[0]
        total = torch.zeros(d, dtype=torch.float64)
        gram = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, n, chunk):  # float32 matmuls per chunk, accumulated in float64
            f = ((x[i:i + chunk].float() - m) / s).flatten(1)
            total += f.sum(0).double()
            gram += (f.T @ f).double()
        mu = total / n
        cov = gram / n - torch.outer(mu, mu)
        lam, u = torch.linalg.eigh(cov)
        lam = lam.clamp_min(0)
        w = (u * (lam + eps).rsqrt()) @ u.T
        w_inv = (u * (lam + eps).sqrt()) @ u.T
        return cls(m, s, mu.float(), w.float(), w_inv.float(), float(eps))

    @property
    def dim(self) -> int:
        return int(self.mu.numel())

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] in [0, 1] scale -> whitened images of the same shape."""
        shape = x.shape
        f = ((x - self.mean.to(x)) / self.std.to(x)).flatten(1) - self.mu.to(x)
        return (f @ self.w.to(x)).reshape(shape)

    def unwhiten(self, z: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`whiten`: whitened images -> [0, 1]-scale pixels."""
        shape = z.shape
        f = z.flatten(1) @ self.w_inv.to(z) + self.mu.to(z)
        return f.reshape(shape) * self.std.to(z) + self.mean.to(z)

    def info(self) -> dict:
        return {"eps": self.eps, "dim": self.dim, "space": "learned in ZCA space; stored unwhitened (pixel space)"}
