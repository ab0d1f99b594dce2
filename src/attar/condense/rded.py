"""``rded``: select and stitch a teacher's most representative real patches (after RDED, Sun et al., CVPR 2024).

No optimisation: for every class, ``candidates`` real images are drawn, each gives ``crops`` random square
crops (area share uniform in ``[min_scale, 1]``); each crop is scored by the teacher's cross-entropy for its
class on the crop resized to the full image (low = the teacher finds it typical of the class). The
``ipc · factor²`` best crops of a class are resized to ``1/factor`` of the side and stitched
``factor × factor`` into ``ipc`` images (best crops first). The teacher's logits on the stitched images
are stored as soft labels (RDED relabels with the teacher; this keeps one label per image, not per patch).
Why: decoupled methods that reuse a trained teacher scale to large data where bi-level matching does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from attar.condense.base import CondenseContext, CondenseOutput, Condenser, Params, gen, register
from attar.errors import AttarError


class RDEDParams(Params):
    teacher: str = Field(..., description="model artifact trained on the real data (scores the crops, labels the images)")
    factor: int = Field(2, ge=1, le=4, description="crops per side of a stitched image (1: whole crops, no stitching)")
    candidates: int = Field(50, ge=1, description="real images drawn per class")
    crops: int = Field(5, ge=1, description="random crops per drawn image")
    min_scale: float = Field(0.5, gt=0, le=1, description="smallest crop area as a share of the image")
    batch_size: int = Field(512, ge=1, description="crops per teacher forward pass")


def random_crops(x: torch.Tensor, k: int, min_scale: float, g: torch.Generator) -> torch.Tensor:
    """``k`` random square crops of every image of ``x`` [N, C, H, W], resized back to H×W: ``[N·k, C, H, W]``."""
    n, _, h, w = x.shape
    side = min(h, w)
    area = min_scale + (1 - min_scale) * torch.rand(n * k, generator=g)
    sizes = (area.sqrt() * side).round().clamp(1, side).long()
    out = []
    for i in range(n * k):
        s = int(sizes[i])
        top = int(torch.randint(0, h - s + 1, (1,), generator=g))
        left = int(torch.randint(0, w - s + 1, (1,), generator=g))
        crop = x[i // k, :, top:top + s, left:left + s]
        out.append(crop if s == h == w else F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """``factor²`` full-size patches [factor², C, H, W] shrunk to 1/factor and tiled row-major into one [C, H, W]."""
    if factor == 1:
        return patches[0]
    _, c, h, w = patches.shape
    ph, pw = h // factor, w // factor
    small = F.interpolate(patches, size=(ph, pw), mode="bilinear", align_corners=False, antialias=True)
    img = patches.new_zeros(c, ph * factor, pw * factor)
    for j in range(factor * factor):
        r, q = divmod(j, factor)
        img[:, r * ph:(r + 1) * ph, q * pw:(q + 1) * pw] = small[j]
    return F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0] if (ph * factor, pw * factor) != (h, w) else img


@register("rded")
class RDED(Condenser):
    summary = "select and stitch a teacher's most typical real crops; soft labels from the teacher (no optimisation)"
    learns_images = False
    relabels = True  # its teacher labels the images; condense() refuses a second soft-label teacher
    Params = RDEDParams

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        from attar.models import load_model
        from attar.train.trainer import predict

        p = self.p
        if ctx.x.dim() != 4:
            raise AttarError("rded stitches image crops; the data are not images [N, C, H, W].")
        if min(ctx.x.shape[-2:]) // p.factor < 4:
            raise AttarError(f"rded factor {p.factor} leaves patches under 4 pixels on {tuple(ctx.x.shape[-2:])} images; "
                             "lower factor (1 = no stitching).")
        teacher, info = load_model(p.teacher)
        if int(info["num_classes"]) != ctx.num_classes:
            raise AttarError(f"rded teacher {p.teacher} predicts {info['num_classes']} classes; the data have {ctx.num_classes}.")
        teacher = teacher.to(ctx.device).eval()
        g = gen(ctx.seed, self.name)
        k = ctx.ipc * p.factor ** 2
        rows = ctx.index.draw(p.candidates, g)  # [C, candidates] (cycled for small classes)
        images, scores_out = [], []
        for c in range(ctx.num_classes):
            crops = random_crops(ctx.x[rows[c]], p.crops, p.min_scale, g)
            logits = predict(teacher, crops.to(ctx.device), p.batch_size).float().cpu()
            ce = F.cross_entropy(logits, torch.full((len(crops),), c), reduction="none")
            best = ce.argsort()[:k]
            if len(best) < k:
                raise AttarError(f"rded needs {k} crops of class {c} (ipc × factor²) but drew {len(best)}; "
                                 "raise candidates or crops.")
            chosen = crops[best]
            images += [stitch(chosen[i * p.factor ** 2:(i + 1) * p.factor ** 2], p.factor) for i in range(ctx.ipc)]
            scores_out.append(float(ce[best].mean()))
        x = torch.stack(images).clamp(0, 1)
        soft = predict(teacher, x.to(ctx.device), p.batch_size).float().cpu()
        return CondenseOutput(x, ctx.labels(), soft=soft,
                              extra={"meta": {"rded": {"teacher": p.teacher, "mean_crop_ce": scores_out},
                                                      "soft_label_teacher": p.teacher}})
