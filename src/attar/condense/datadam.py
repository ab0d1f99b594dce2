"""``datadam``: Dataset Distillation with Attention Matching (Sajedi et al., ICCV 2023), simplified.

Like DM (fresh random networks, siamese DSA per class, all classes in one batch), but the loss also
matches *spatial attention maps* of every intermediate stage: for a feature map ``f`` [N, K, H, W],
``a = normalise(mean_k |f_k|^p)`` flattened; the per-class mean map of real and synthetic rows is
compared with a squared L2 distance, summed over stages and classes, plus ``mmd_weight`` times the
DM loss on the final embedding. The defaults (``p = 4``, ``mmd_weight = 0.01``) are this
implementation's choices, not checked against the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.condense.base import CondenseContext, register
from attar.condense.chunking import cpu_rows, forward_rows
from attar.condense.dm import DM, MatchParams


def attention(f: torch.Tensor, power: float) -> torch.Tensor:
    a = f.abs().pow(power).mean(1).flatten(1)
    return F.normalize(a, dim=1)


@register("datadam")
class DataDAM(DM):
    summary = "attention matching: spatial attention maps of every stage + final-embedding means"

    class Params(MatchParams):
        power: float = Field(4.0, gt=0, description="exponent of the attention map mean_k |f_k|^p")
        mmd_weight: float = Field(0.01, ge=0, description="weight of the final-embedding mean matching term")

    def loss(self, net, xr: torch.Tensor, xs: torch.Tensor, ctx: CondenseContext) -> torch.Tensor:
        c = ctx.num_classes
        sizes: list[int] = []

        def features(x: torch.Tensor) -> torch.Tensor:
            """Each row's attention maps of every stage but the last, then its embedding, side by side (rows stay
            independent, so CPU chunks give the values of one call: :mod:`attar.condense.chunking`)."""
            grabbed: list[torch.Tensor] = []
            hooks = [net.get_submodule(p).register_forward_hook(lambda m, i, o: grabbed.append(o))
                     for p in getattr(net, "stage_paths", [])[:-1]]
            try:
                e = net.embed(x)
            finally:
                for h in hooks:
                    h.remove()
            parts = [attention(f, self.p.power) for f in grabbed] + [e]
            sizes[:] = [q.shape[1] for q in parts]
            return torch.cat(parts, 1)

        rows = cpu_rows(net, ctx.device)
        with torch.no_grad():
            fr = forward_rows(features, xr, rows)
        fs = forward_rows(features, xs, rows)
        gap = (fr.view(c, -1, fr.shape[1]).mean(1) - fs.view(c, -1, fs.shape[1]).mean(1)).square()
        *maps, embedding = gap.split(sizes, 1)
        return sum((m.sum() for m in maps), xs.new_zeros(())) + self.p.mmd_weight * embedding.sum()
