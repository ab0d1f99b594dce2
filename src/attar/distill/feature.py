"""Feature distillation on forward hooks: ``feature`` (FitNets-style hints, torchdistill hooks) and ``nd``
(normalised knowledge distillation), both on :class:`HookedKD`, logit KD plus tensors captured by forward
hooks on module paths named in the recipe. Hooks need the teacher run live on the student's batch, so
these objectives never use the teacher cache."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from attar.distill.hooks import Capture, feature_dim, last_linear, resolve_module
from attar.distill.kd import KD, KDParams
from attar.errors import AttarError
from attar.train import distributed as dist
from attar.train.objective import Batch, device_of, register

__all__ = ["HookedKD", "FeatureKD", "ND", "nd_loss"]


class HookedKD(KD):
    """Logit KD plus :class:`~attar.distill.hooks.Capture` hooks made in ``setup`` (``self._hooks``), read once
    per batch, and removed by ``finalize`` so the saved model carries no hooks. Subclasses own ``setup``."""

    needs_live_teacher = True

    def _remove_hooks(self) -> None:
        for c in getattr(self, "_hooks", []):
            c.remove()
        self._hooks = []

    def finalize(self, student: nn.Module) -> nn.Module:
        self._remove_hooks()
        return student

    def _captured(self) -> list[torch.Tensor | None]:
        """This batch's captured tensors, one per hook (None where the module did not run)."""
        if not getattr(self, "_hooks", None):
            raise AttarError(f"objective {self.name!r} was not set up: call setup(...) before the first batch.")
        return [c.pop() for c in self._hooks]

    def _student_teacher(self, logits: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's captured features, checked to belong to this batch."""
        fs, ft = self._captured()
        if ft is None:
            raise AttarError(
                f"objective {self.name!r}: the teacher's {what} did not run on this batch. It needs the teacher run "
                "live on the same inputs (turn the teacher cache off: train.teacher_cache: off)."
            )
        if fs is None or fs.shape[0] != logits.shape[0] or ft.shape[0] != logits.shape[0]:
            raise AttarError(f"objective {self.name!r}: the captured features do not belong to this batch.")
        return fs, ft


def _project(x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
    """Apply a channel projector: Linear on ``[B, D]`` and ``[B, L, D]``; a 1x1 conv on ``[B, C, H, W]``."""
    if isinstance(proj, nn.Identity):
        return x
    if x.dim() == 4:
        return F.conv2d(x, proj.weight[:, :, None, None], proj.bias)
    return proj(x)


def _channels(x: torch.Tensor) -> int:
    return x.shape[1] if x.dim() == 4 else x.shape[-1]


def _match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool both maps to the smaller spatial size (4-D) or token count (3-D)."""
    if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
    elif s.dim() == 3 and s.shape[1] != t.shape[1]:
        n = min(s.shape[1], t.shape[1])
        s = F.adaptive_avg_pool1d(s.transpose(1, 2), n).transpose(1, 2)
        t = F.adaptive_avg_pool1d(t.transpose(1, 2), n).transpose(1, 2)
    return s, t


@register("feature")
class FeatureKD(HookedKD):
    """Feature KD (FitNets-style hints, torchdistill hooks) on top of logit KD:
    ``loss = α·CE + (1−α)·D(p_T ‖ q_T) + β·L_feat(P(f_s), f_t)``.

    ``f_s``/``f_t`` are the outputs of the modules at ``student_layer``/``teacher_layer``
    (dotted paths, captured by forward hooks; the first teacher of an ensemble). ``P`` is a
    learned channel projector ``Linear(D_s, D_t)``, applied as a 1x1 conv on 4-D maps; maps of
    different spatial size are adaptive-average-pooled to the smaller one. ``L_feat``: ``mse``
    (mean squared error over all elements) or ``cosine`` (``1 − cos`` along channels, averaged
    over positions and rows). 3-D features are read as tokens ``[B, L, D]``. Channel sizes are
    read from the named modules (or the last layer before them); give ``student_dim`` /
    ``teacher_dim`` when that guess cannot work (e.g. after Flatten).

    The teacher must run live on the same batch so its hook fires (``needs_live_teacher``).
    """

    class Params(KDParams):
        student_layer: str = Field(description="module path in the student whose output is matched")
        teacher_layer: str = Field(description="module path in the teacher whose output is the target")
        loss: Literal["mse", "cosine"] = Field("mse", description="feature distance")
        beta: float = Field(1.0, ge=0, description="weight of the feature term")
        projector: bool = Field(True, description="learn a projector (required when channel sizes differ)")
        student_dim: int | None = Field(None, gt=0, description="channels of the student feature (inferred if unset)")
        teacher_dim: int | None = Field(None, gt=0, description="channels of the teacher feature (inferred if unset)")

    def setup(self, student, teachers, num_classes, train_size) -> None:
        self._remove_hooks()
        if not teachers:
            raise AttarError("objective 'feature' needs a teacher model (run live) for its feature hooks.")
        s_mod = resolve_module(student, self.p.student_layer, "objective 'feature' (field 'student_layer')")
        t_mod = resolve_module(teachers[0], self.p.teacher_layer, "objective 'feature' (field 'teacher_layer')")
        ds = self.p.student_dim or feature_dim(student, self.p.student_layer)
        dt = self.p.teacher_dim or feature_dim(teachers[0], self.p.teacher_layer)
        if ds is None or dt is None:
            raise AttarError(
                "objective 'feature': cannot infer the channel size of "
                f"{'student_layer' if ds is None else 'teacher_layer'}; set 'student_dim' and 'teacher_dim'."
            )
        if ds != dt and not self.p.projector:
            raise AttarError(
                f"objective 'feature': student features have {ds} channels and the teacher's {dt}; "
                "set projector: true to learn a mapping."
            )
        self.dims = (ds, dt)
        self.projector = nn.Linear(ds, dt).to(device_of(student)) if self.p.projector else nn.Identity()
        self._hooks = [Capture(s_mod, "output"), Capture(t_mod, "output")]

    def feature_loss(self, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        ft = ft.detach().float()
        if fs.dim() != ft.dim() or fs.dim() not in (2, 3, 4):
            raise AttarError(
                f"objective 'feature': student feature {tuple(fs.shape)} and teacher feature {tuple(ft.shape)} "
                "must both be [B, D], [B, L, D] or [B, C, H, W]; pick layers of matching kind."
            )
        for label, x, d in (("student", fs, self.dims[0]), ("teacher", ft, self.dims[1])):
            if _channels(x) != d:
                raise AttarError(
                    f"objective 'feature': the {label} feature has {_channels(x)} channels (shape "
                    f"{tuple(x.shape)}) but {d} were expected; set '{label}_dim: {_channels(x)}'."
                )
        ps = _project(fs.float(), self.projector)
        ps, ft = _match_spatial(ps, ft)
        if self.p.loss == "mse":
            return F.mse_loss(ps, ft)
        cdim = 1 if ps.dim() == 4 else -1
        return (1 - F.cosine_similarity(ps, ft, dim=cdim, eps=1e-8)).mean()

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        fs, ft = self._student_teacher(logits, "layer")
        out = self._kd_losses(batch, logits, logits)
        feat = self.feature_loss(fs, ft)
        out["loss"] = out["loss"] + self.p.beta * feat
        out["feature"] = feat.detach()

        return out


def nd_loss(fs: torch.Tensor, ft: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Per-row ND loss (Wang et al. 2023, official code): ``1 − ⟨f_s, ĉ_y⟩ / max(‖f_s‖, ‖f_t‖)``.

    ``ĉ_y`` is the unit teacher class-mean of the row's class. While ``‖f_s‖ < ‖f_t‖`` this is
    ``1 − (‖f_s‖/‖f_t‖)·cos(f_s, c_y)``: it rewards aligning the direction with the class mean
    *and* growing the norm; once ``‖f_s‖ ≥ ‖f_t‖`` it is ``1 − cos`` and stops pushing the norm —
    a hinge toward the teacher's norm, so the norm term cannot diverge."""
    e = F.normalize(centers, dim=-1, eps=1e-12)
    denom = torch.maximum(fs.norm(dim=-1), ft.norm(dim=-1)).clamp_min(1e-12)
    return 1 - (fs * e).sum(-1) / denom


@register("nd")
class ND(HookedKD):
    """ND loss on top of logit KD: ``loss = α·CE + (1−α)·D + β·mean_i nd_loss(P f_s, f_t, c_{y_i})``.

    ``f_s``/``f_t``: the student's/teacher's penultimate features, i.e. the input of the final
    Linear (found automatically, or module paths ``student_head``/``teacher_head``); ``P`` a
    learned Linear when their sizes differ. Needs the teacher live (its per-sample features give
    the target norm and the class means).

    Class means ``c_y`` (attar's choice, documented): exact running means of the teacher's features
    per class, accumulated in buffers (``center_sum``, ``center_count``) during the first
    ``center_epochs`` epochs (default 1) and frozen after — the teacher is fixed, so one pass
    over the training data estimates its class means, as the paper's precomputed centers do.
    ``center_epochs: 0`` keeps accumulating for the whole run. A row's class is its label, or
    the teacher's argmax for unlabeled rows; rows whose class has no mean yet are skipped.
    Under DDP the per-batch sums are all-reduced so every rank holds the same means.
    """

    class Params(KDParams):
        beta: float = Field(1.0, ge=0, description="weight of the ND term")
        center_epochs: int = Field(1, ge=0, description="epochs over which class means are accumulated (0 = all)")
        student_head: str | None = Field(None, description="module path of the student's final Linear")
        teacher_head: str | None = Field(None, description="module path of the teacher's final Linear")

    def setup(self, student, teachers, num_classes, train_size) -> None:
        self._remove_hooks()
        if not teachers:
            raise AttarError("objective 'nd' needs a teacher model (run live) for its feature hooks.")
        hs = self._head(student, self.p.student_head, "student_head")
        ht = self._head(teachers[0], self.p.teacher_head, "teacher_head")
        c = num_classes or ht.out_features
        dev = device_of(student)
        self.projector = (
            nn.Linear(hs.in_features, ht.in_features).to(dev) if hs.in_features != ht.in_features else nn.Identity()
        )
        self.register_buffer("center_sum", torch.zeros(c, ht.in_features, device=dev))
        self.register_buffer("center_count", torch.zeros(c, device=dev))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long, device=dev))
        self._hooks = [Capture(hs, "input"), Capture(ht, "input")]

    @staticmethod
    def _head(model: nn.Module, path: str | None, field: str) -> nn.Linear:
        if path is None:
            return last_linear(model, f"objective 'nd' ({field})")[1]
        m = resolve_module(model, path, f"objective 'nd' (field {field!r})")
        if not isinstance(m, nn.Linear):
            raise AttarError(f"objective 'nd': {field} {path!r} is a {type(m).__name__}, not an nn.Linear.")
        return m

    def centers(self) -> torch.Tensor:
        return self.center_sum / self.center_count.clamp_min(1).unsqueeze(1)

    def _accumulate(self, ft: torch.Tensor, cls: torch.Tensor) -> None:
        s = torch.zeros_like(self.center_sum).index_add_(0, cls, ft.to(self.center_sum))
        n = torch.zeros_like(self.center_count).index_add_(0, cls, torch.ones_like(cls, dtype=self.center_count.dtype))
        if dist.world_size() > 1:
            tdist.all_reduce(s)
            tdist.all_reduce(n)
        self.center_sum += s
        self.center_count += n

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        fs, ft = self._student_teacher(logits, "head")
        fs, ft = fs.flatten(1).float(), ft.detach().flatten(1).float()
        out = self._kd_losses(batch, logits, logits)
        tl = batch.teacher_logits
        tl = tl.mean(0) if tl.dim() == 3 else tl
        y = batch.y.to(logits.device)
        cls = torch.where(y >= 0, y, tl.to(logits.device).argmax(-1))
        if self.training and (self.p.center_epochs == 0 or int(self.epoch) < self.p.center_epochs):
            with torch.no_grad():
                self._accumulate(ft, cls)
        has = self.center_count[cls] > 0
        g = _project(fs, self.projector)
        if bool(has.any()):
            per = nd_loss(g[has], ft[has], self.centers()[cls[has]])
            nd = per.mean()
            with torch.no_grad():
                out["direction"] = (1 - F.cosine_similarity(g[has], self.centers()[cls[has]], dim=-1)).mean()
                out["norm_ratio"] = (g[has].norm(dim=-1) / ft[has].norm(dim=-1).clamp_min(1e-12)).mean()
        else:
            nd = g.sum() * 0.0
        out["loss"] = out["loss"] + self.p.beta * nd
        out["nd"] = nd.detach()
        return out

    def on_epoch_end(self, epoch: int, num_epochs: int) -> None:
        self.epoch.fill_(epoch + 1)
