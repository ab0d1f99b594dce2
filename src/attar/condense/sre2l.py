"""``sre2l`` (Yin et al., NeurIPS 2023: squeeze, recover, relabel) and ``cda`` (Yin & Shen, TMLR 2024: SRe²L with a
global-to-local crop curriculum during recovery).

Squeeze: a teacher with BatchNorm trained on the real data (``teacher``: a model artifact; unset: the condensation
ConvNet with ``norm: batchnorm`` trained ``teacher_epochs`` here by the Trainer and cached). Recover: images from
Gaussian noise (standardised pixels) minimise ``CE(teacher(A(x)), y) + r_bn · R_BN(A(x))`` (see
:mod:`attar.condense.bn_matching`), ``A`` a random-resized crop (area share in ``[min_scale, 1]``) + flip + roll
jitter per iteration. Relabel: the teacher's logits on the final images are the soft labels, and the artifact names
the teacher (``soft_label_teacher``), so ``condense evaluate``'s equal-label random control uses the same one.
Why: no bi-level optimisation and no real images at synthesis time, so the cost grows with the teacher, not with the
data (the route that scales to ImageNet).

``cda`` differs only in ``min_scale``: it starts at 1 (whole-image crops: the global outline first) and falls to
``crop_min`` by ``milestone`` of the iterations (``curriculum``: cosine, the reference default, linear or step).
Defaults are the reference code's CIFAR settings: Adam lr 0.25 (betas 0.5, 0.9, cosine), ``r_bn`` 0.01, first BN
layer ×10, 1,000 iterations, batches of 100, jitter 4 px on 32 px (here 1/8 of the side).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attar.condense.base import CondenseContext, CondenseOutput, Condenser, Params, register
from attar.condense.bn_matching import bn_spec, crop_min_scale, load_teacher, recover, summary, trained_net
from attar.errors import AttarError
from attar.specs import ModelSpec


class RecoverParams(Params):
    teacher: str | None = Field(None, description="model artifact with BatchNorm trained on the real data (unset: train one)")
    teacher_model: ModelSpec | None = Field(None, description="architecture of the teacher trained here (default: the "
                                            "condensation model with norm: batchnorm)")
    teacher_epochs: int = Field(30, ge=1, description="epochs of the teacher trained here")
    lr: float = Field(0.25, gt=0, description="Adam learning rate of the images (standardised pixels), cosine-decayed")
    r_bn: float = Field(0.01, ge=0, description="weight of the BatchNorm-statistic loss")
    first_bn_multiplier: float = Field(10.0, ge=0, description="extra weight of the first BatchNorm layer")
    crop_min: float = Field(0.08, gt=0, le=1, description="smallest random-resized-crop area share")
    flip: bool = Field(True, description="random horizontal flips during recovery")
    jitter: int | None = Field(None, ge=0, description="roll jitter in pixels (unset: 1/8 of the image side)")
    batch_size: int = Field(100, ge=1, description="images per recovery batch (BatchNorm statistics are per batch)")
    from_real: bool = Field(False, description="start from real images of each class instead of Gaussian noise")


class CDAParams(RecoverParams):
    curriculum: Literal["cosine", "linear", "step"] = Field("cosine", description="how the crop's smallest area share "
                                                            "falls from 1 to crop_min")
    milestone: float = Field(1.0, gt=0, le=1, description="share of the iterations by which it reaches crop_min")


def _no_plugins(ctx: CondenseContext, method: str) -> None:
    if ctx.flip:
        raise AttarError(f"{method} recovers images with random flips already; drop flip (the FYI plug-in).")
    if ctx.zca is not None:
        raise AttarError(f"{method} matches a teacher trained on pixels; drop zca.")
    if len(ctx.input_shape) != 3:
        raise AttarError(f"{method} crops images; the data are not images [N, C, H, W] (shape {ctx.input_shape}).")


def teacher_for(ctx: CondenseContext, p: RecoverParams, method: str, seed_part: int = 0, width: int | None = None):
    """``(model, artifact path, validation accuracy or None)``: the given teacher, or one trained here (seeded by
    ``seed_part``, not the condensation seed, so every condensation seed reuses the same cached teacher)."""
    if p.teacher is not None:
        return load_teacher(p.teacher, ctx, method), p.teacher, None
    spec = p.teacher_model or bn_spec(ctx.model)
    if width is not None:
        spec = spec.model_copy(update={"width": width})
    return trained_net(ctx, spec, p.teacher_epochs, seed=seed_part, method=method)


@register("sre2l")
class SRe2L(Condenser):
    summary = "squeeze, recover, relabel: images from noise matching a BatchNorm teacher's statistics + CE; teacher soft labels"
    learns_images = True
    default_iterations = 1000
    relabels = True  # its teacher labels the images; condense() refuses a second soft-label teacher
    Params = RecoverParams

    def min_scale(self, it: int, total: int) -> float:
        return crop_min_scale(it, total, "constant", low=self.p.crop_min)

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        from attar.train.trainer import predict

        _no_plugins(ctx, self.name)
        teacher, path, acc = teacher_for(ctx, self.p, self.name)
        x, log = recover(ctx, [teacher], [1.0], self.p, self.name, self.min_scale)
        soft = predict(teacher, x.to(ctx.device)).float().cpu()
        info = {"teacher": path, "teacher_val_accuracy": acc, "trained_teacher": self.p.teacher is None, **summary(log)}
        return CondenseOutput(x, ctx.labels(), soft=soft, extra={"meta": {
            self.name: info, "soft_label_teacher": path, "init": "real" if self.p.from_real else "noise"}})


@register("cda")
class CDA(SRe2L):
    summary = "SRe²L with a global-to-local crop curriculum during recovery (crop area share 1 → crop_min)"
    Params = CDAParams

    def min_scale(self, it: int, total: int) -> float:
        return crop_min_scale(it, total, self.p.curriculum, self.p.milestone, self.p.crop_min)
