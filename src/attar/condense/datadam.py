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
        grabbed: list[torch.Tensor] = []
        hooks = [net.get_submodule(p).register_forward_hook(lambda m, i, o: grabbed.append(o))
                 for p in getattr(net, "stage_paths", [])[:-1]]
        try:
            with torch.no_grad():
                er = net.embed(xr)
            ar = [attention(f, self.p.power) for f in grabbed]
            grabbed.clear()
            es = net.embed(xs)
            as_ = [attention(f, self.p.power) for f in grabbed]
        finally:
            for h in hooks:
                h.remove()
        loss = xs.new_zeros(())
        for a_r, a_s in zip(ar, as_):
            loss = loss + (a_r.view(c, -1, a_r.shape[1]).mean(1) - a_s.view(c, -1, a_s.shape[1]).mean(1)).square().sum()
        mr, ms = er.view(c, -1, er.shape[1]).mean(1), es.view(c, -1, es.shape[1]).mean(1)
        return loss + self.p.mmd_weight * (mr - ms).square().sum()
