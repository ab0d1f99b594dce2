"""``cvdd``: Committee Voting for Dataset Distillation (Cui et al., 2025): SRe²L's recovery against a committee of
BatchNorm teachers instead of one.

Each iteration, ``selected`` members (default 2, as the reference's N2 voter; all when the committee is smaller)
are drawn at random and the images minimise ``Σ_m w_m [CE_m + r_bn · R_BN,m]`` over them, with the voter's weights
``w = softmax(prior / vote_temperature)`` (``voter: prior``; the prior of a member is its validation accuracy in
percent, the reference code uses each architecture's measured accuracy, temperature 5) or ``1/M`` (``voter:
equal``). Soft labels: the committee's mixture ``log Σ_m w_m softmax(m(x))`` over *all* members with the same
weights (``equal``: their plain mean). **Choice:** the reference scripts relabel with a single ResNet-18; this keeps
one label source per image, the committee itself. The artifact records the committee (``soft_label_committee``),
so ``condense evaluate``'s equal-label random control is labelled by the same committee.

Teachers: ``teachers`` (model artifacts with BatchNorm), or ``committee`` members trained here and cached: the
condensation ConvNet with BatchNorm at widths ``w, w/2, w/4, …`` (at least 8), each with its own seed (the paper uses
different architectures; widths and seeds are this implementation's stand-in for that diversity). Images start from
real images of their class (``from_real`` true; the reference initialises from selected real patches).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from attar.condense.base import CondenseContext, CondenseOutput, Condenser, register
from attar.condense.bn_matching import Committee, bn_spec, crop_min_scale, load_teacher, recover, summary, trained_net, vote_weights
from attar.condense.sre2l import RecoverParams, _no_plugins


class CVDDParams(RecoverParams):
    teachers: list[str] | None = Field(None, description="model artifacts with BatchNorm (unset: train `committee` here)")
    committee: int = Field(2, ge=1, le=8, description="members trained here when teachers is unset")
    selected: int = Field(2, ge=1, description="members that vote in each iteration (drawn at random)")
    voter: Literal["prior", "equal"] = Field("prior", description="prior: softmax(validation accuracy % / vote_temperature)")
    vote_temperature: float = Field(5.0, gt=0)
    from_real: bool = Field(True, description="start from real images of each class (false: Gaussian noise)")

    @model_validator(mode="after")
    def _one_teacher_field(self) -> "CVDDParams":
        if self.teacher is not None:
            raise ValueError("cvdd takes a committee: teachers: [A, B] (a list of model artifacts), not teacher")
        return self


@register("cvdd")
class CVDD(Condenser):
    summary = "committee voting: recovery against several BatchNorm teachers with prior-weighted votes; committee soft labels"
    learns_images = True
    default_iterations = 1000
    relabels = True  # its teacher labels the images; condense() refuses a second soft-label teacher
    Params = CVDDParams

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        from attar.train.trainer import predict

        p = self.p
        _no_plugins(ctx, self.name)
        members, paths, priors = [], [], []
        if p.teachers:
            for path in p.teachers:
                members.append(load_teacher(path, ctx, self.name))
                paths.append(path)
                priors.append(self._prior(path))
        else:
            base = p.teacher_model or bn_spec(ctx.model)
            width = base.width or 128
            for k in range(p.committee):
                spec = base.model_copy(update={"width": max(8, width // 2 ** k)}) if base.arch == "convnet" else base
                m, path, acc = trained_net(ctx, spec, p.teacher_epochs, seed=k, method=self.name)
                members.append(m)
                paths.append(path)
                priors.append(100.0 * acc)
        x, log = recover(ctx, members, priors, p, self.name,
                         lambda it, total: crop_min_scale(it, total, "constant", low=p.crop_min),
                         voter=p.voter, vote_temperature=p.vote_temperature, selected=p.selected)
        weights = vote_weights(priors, p.voter, p.vote_temperature)
        soft = predict(Committee(members, weights), x.to(ctx.device)).float().cpu()
        info = {"teachers": paths, "priors": priors, "weights": weights, "voter": p.voter, **summary(log)}
        return CondenseOutput(x, ctx.labels(), soft=soft, extra={"meta": {
            self.name: info, "soft_label_committee": {"teachers": paths, "weights": weights},
            "init": "real" if p.from_real else "noise"}})

    @staticmethod
    def _prior(path: str) -> float:
        """A given teacher's prior: its recorded validation accuracy (percent) when it has one, else 100 (equal)."""
        import json
        from pathlib import Path

        try:
            info = json.loads((Path(path) / "state.json").read_text())
        except (OSError, ValueError):
            return 100.0
        for k in ("val_accuracy", "accuracy"):
            v = info.get(k) if isinstance(info.get(k), (int, float)) else (info.get("metrics") or {}).get(k)
            if isinstance(v, (int, float)):
                return 100.0 * float(v) if v <= 1 else float(v)
        return 100.0
