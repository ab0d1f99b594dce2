"""Training objectives: every training method is an :class:`~attar.objective.Objective`.

Build one from a recipe mapping with :func:`build_objective` (``{"name": "kd", "temperature": 4}``).
Each objective declares a strict pydantic ``Params`` model; a wrong or unknown field raises an
``AttarError`` naming the field, what was expected and every accepted field.

Conventions shared by all objectives

* Labels ``y == -1`` mark unlabeled rows. Cross-entropy terms average over the labeled rows
  only; a batch without any labeled row contributes exactly 0 (not NaN) to them. Teacher
  terms use every row.
* ``batch.teacher_logits`` is ``[B, C]`` (one teacher) or ``[T, B, C]`` (an ensemble). An
  ensemble's target is the average of the teachers' *probabilities* at temperature ``τ``
  (MEAL V2), passed on as the logits ``τ·log p̄_τ`` — exact, since
  ``softmax(τ·log p̄_τ / τ) = p̄_τ`` (see :func:`teacher_target`).
* The weight ``alpha`` always multiplies the label term: ``loss = α·CE + (1−α)·D``.
* All state lives in parameters/buffers of the objective (created in ``setup``), so the
  trainer optimises and checkpoints it with the model and resume is exact. Students and
  teachers are never registered as submodules of an objective.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal, get_args, get_origin

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from attar.distill.divergences import DIVERGENCES, divergence, divergence_params
from attar.distill.hooks import Capture, feature_dim, last_linear, resolve_module
from attar.errors import AttarError
from attar.objective import Batch, Objective
from attar.registry import Registry
from attar.train import distributed as dist

__all__ = [
    "OBJECTIVES",
    "build_objective",
    "objective_fields",
    "teacher_target",
    "masked_ce",
    "nd_loss",
    "CE",
    "KD",
    "LabelFree",
    "Ensemble",
    "PSKD",
    "DHO",
    "FeatureKD",
    "ND",
]

OBJECTIVES: Registry[type["ParamObjective"]] = Registry("objective")


# ----------------------------------------------------------------------------------------------
# Parameters: strict pydantic models with errors that list the accepted fields
# ----------------------------------------------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _type_str(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    s = getattr(annotation, "__name__", None) if not get_args(annotation) else None
    return s or str(annotation).replace("typing.", "")


def _constraints(info) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return (" " + " and ".join(parts)) if parts else ""


def _describe_fields(params_cls: type[BaseModel]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, info in params_cls.model_fields.items():
        out[name] = {
            "type": _type_str(info.annotation) + _constraints(info),
            "default": None if info.is_required() else info.get_default(call_default_factory=True),
            "required": info.is_required(),
            "description": info.description or "",
        }
    return out


def _fields_text(name: str, params_cls: type[BaseModel], div: str | None = None) -> str:
    lines = []
    for f, d in _describe_fields(params_cls).items():
        dflt = "required" if d["required"] else f"default {d['default']!r}"
        lines.append(f"{f} ({d['type']}, {dflt})" + (f": {d['description']}" if d["description"] else ""))
    text = f"Accepted fields of objective {name!r}: " + "; ".join(lines) + "."
    if div is not None and div in DIVERGENCES:
        dp = divergence_params(div)
        if dp:
            text += (
                f" Divergence {div!r} also accepts " + ", ".join(f"{k} (default {v!r})" for k, v in dp.items())
                + " (top-level, or under divergence_args)."
            )
    return text


def objective_fields(name: str) -> dict[str, dict[str, Any]]:
    """``{field: {type, default, required, description}}`` of objective ``name`` (for docs/CLI)."""
    return _describe_fields(OBJECTIVES.get(name).Params)


def build_objective(spec: dict[str, Any]) -> "ParamObjective":
    """``{"name": "kd", **params}`` -> a configured objective (not yet set up)."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise AttarError(
            "an objective must be a mapping with a 'name', e.g. {name: kd, temperature: 4}; "
            f"known objectives: {', '.join(OBJECTIVES.names())}."
        )
    params = dict(spec)
    name = params.pop("name")
    return OBJECTIVES.get(name)(**params)


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def masked_ce(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy averaged over the labeled rows (``y >= 0``); exactly 0 if there are none.

    The zero keeps the graph (``logits.sum() * 0``) so ``.backward()`` works on any batch."""
    lab = y >= 0
    if not bool(lab.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[lab].float(), y[lab], label_smoothing=label_smoothing)


def teacher_target(teacher_logits: torch.Tensor | None, student_logits: torch.Tensor, temperature: float,
                   who: str) -> torch.Tensor:
    """The teacher's ``[B, C]`` logits for the divergence; an ensemble ``[T, B, C]`` becomes
    ``τ·log( (1/T) Σ_t softmax(z_t/τ) )`` so that ``softmax(·/τ)`` is exactly the averaged
    probabilities (MEAL V2's target). Always detached, float32, on the student's device."""
    if teacher_logits is None:
        raise AttarError(
            f"objective {who!r} needs teacher logits but the batch has none: give the stage a 'teacher'."
        )
    t = teacher_logits.detach().to(device=student_logits.device, dtype=torch.float32)
    if t.dim() == 3:
        if t.shape[0] == 1:
            t = t[0]
        else:
            logp = torch.log_softmax(t / temperature, dim=-1)
            t = temperature * (torch.logsumexp(logp, dim=0) - math.log(t.shape[0]))
    if t.dim() != 2 or t.shape != student_logits.shape:
        raise AttarError(
            f"objective {who!r}: teacher logits of shape {tuple(teacher_logits.shape)} do not match the "
            f"student's {tuple(student_logits.shape)} (expected [B, C] or [teachers, B, C]); do the "
            "teacher and student predict the same classes, and is the cache built on this training set?"
        )
    return t


class ParamObjective(Objective):
    """An objective configured by a strict ``Params`` model (``self.p``)."""

    Params: ClassVar[type[_Params]] = _Params
    name: ClassVar[str] = "?"

    def __init__(self, **params: Any):
        super().__init__()
        self.p = self._validate(params)

    @classmethod
    def _validate(cls, params: dict[str, Any]) -> Any:
        params = dict(params)
        fields = cls.Params.model_fields
        div = None
        if "divergence" in fields:
            div = params.get("divergence", fields["divergence"].default)
            if not isinstance(div, str) or div not in DIVERGENCES:
                raise AttarError(
                    f"objective {cls.name!r}: field 'divergence' = {div!r} is not a known divergence; "
                    f"expected one of {', '.join(DIVERGENCES.names())}."
                )
            accepted = divergence_params(div)
            dargs = dict(params.get("divergence_args") or {})
            for k in [k for k in params if k not in fields and k in accepted]:
                dargs[k] = params.pop(k)  # flat divergence params, e.g. {divergence: gjsd, beta: 0.3}
            unknown = sorted(set(dargs) - set(accepted))
            if unknown:
                acc = ", ".join(f"{k} (default {v!r})" for k, v in accepted.items()) or "none"
                raise AttarError(
                    f"objective {cls.name!r}: divergence {div!r} does not accept {', '.join(map(repr, unknown))}. "
                    f"Its parameters: {acc}."
                )
            if dargs:
                params["divergence_args"] = dargs
        try:
            p = cls.Params(**params)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"]) or "(the mapping)"
                if err["type"] == "extra_forbidden":
                    problems.append(f"unknown field {loc!r}")
                elif err["type"] == "missing":
                    problems.append(f"missing required field {loc!r}")
                else:
                    problems.append(f"field {loc!r} = {err.get('input')!r}: {err['msg']}")
            raise AttarError(
                f"objective {cls.name!r}: " + "; ".join(problems) + ". " + _fields_text(cls.name, cls.Params, div)
            ) from None
        return p

    # helpers -----------------------------------------------------------------------------
    def _div(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return divergence(self.p.divergence, student_logits, teacher_logits, self.p.temperature,
                          **self.p.divergence_args)

    @staticmethod
    def _device(module: nn.Module) -> torch.device:
        for t in list(module.parameters()) + list(module.buffers()):
            return t.device
        return torch.device("cpu")


def _register(name: str):
    def deco(cls):
        cls.name = name
        return OBJECTIVES.register(name)(cls)

    return deco


_ALPHA_DOC = "weight of the cross-entropy on labeled rows; the teacher term gets 1 - alpha"
_T_DOC = "softmax temperature of the teacher term"
_DIV_DOC = "any registered divergence (kl, reverse_kl, js, gjsd, skew_kl, tvd, sinkhorn, ...)"


class _KDParams(_Params):
    alpha: float = Field(0.5, ge=0, le=1, description=_ALPHA_DOC)
    temperature: float = Field(4.0, gt=0, description=_T_DOC)
    divergence: str = Field("kl", description=_DIV_DOC)
    divergence_args: dict[str, Any] = Field(default_factory=dict, description="extra divergence parameters")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the CE term")


# ----------------------------------------------------------------------------------------------
# Plain objectives
# ----------------------------------------------------------------------------------------------


@_register("ce")
class CE(ParamObjective):
    """Cross-entropy on the labels, ``−log softmax(z)_y`` averaged over labeled rows."""

    class Params(_Params):
        label_smoothing: float = Field(0.0, ge=0, lt=1, description="mix this much uniform mass into the target")

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = masked_ce(logits, batch.y, self.p.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}


@_register("kd")
class KD(ParamObjective):
    """Logit KD (Hinton et al. 2015): ``α·CE(z_s, y) + (1−α)·D(p_T ‖ q_T)``.

    ``D`` is any registered divergence on the temperature-softened distributions (the KL family
    already carries the ``T²`` factor). The divergence covers every row, labeled or not, so
    ``alpha=0`` is label-free KD on an unlabeled pool (SSLD, PD, SimCLRv2 step 3); an ensemble
    of teachers is distilled through its averaged probabilities (:func:`teacher_target`).
    """

    needs_teacher = True
    Params = _KDParams

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._kd_losses(batch, logits, logits)

    def _kd_losses(self, batch: Batch, ce_logits: torch.Tensor, kd_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        a = getattr(self.p, "alpha", 0.0)
        target = teacher_target(batch.teacher_logits, kd_logits, self.p.temperature, self.name)
        kd = self._div(kd_logits, target)
        out: dict[str, torch.Tensor] = {}
        if a > 0:
            ce = masked_ce(ce_logits, batch.y, getattr(self.p, "label_smoothing", 0.0))
            loss = a * ce + (1 - a) * kd
            out["ce"] = ce.detach()
        else:
            loss = kd
        out["kd"] = kd.detach()
        out["loss"] = loss
        return out


@_register("label_free")
class LabelFree(KD):
    """Label-free KD: ``D(p_T ‖ q_T)`` only; labels are ignored entirely (``kd`` with ``alpha=0``)."""

    class Params(_Params):
        temperature: float = Field(4.0, gt=0, description=_T_DOC)
        divergence: str = Field("kl", description=_DIV_DOC)
        divergence_args: dict[str, Any] = Field(default_factory=dict, description="extra divergence parameters")


@_register("ensemble")
class Ensemble(KD):
    """MEAL V2-style ensemble KD: target ``p̄ = (1/T) Σ_t softmax(z_t/τ)``, loss
    ``KL(p̄ ‖ softmax(z_s/τ))·τ²`` (+ ``α·CE``; default ``α=0``: no hard labels, as MEAL V2).

    Accepts ``[T, B, C]`` live teacher logits or ``[B, C]`` (one teacher, or a cache that already
    holds ``τ·log p̄``). MEAL V2's discriminator term is not included."""

    class Params(_KDParams):
        alpha: float = Field(0.0, ge=0, le=1, description=_ALPHA_DOC + " (MEAL V2 uses none: 0)")
        temperature: float = Field(1.0, gt=0, description=_T_DOC + " (MEAL V2: 1)")


# ----------------------------------------------------------------------------------------------
# PS-KD: progressive self-knowledge distillation
# ----------------------------------------------------------------------------------------------


def _all_gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate equal-first-dim tensors from every rank (variable row counts); identity if not distributed."""
    if dist.world_size() == 1:
        return tensors
    import torch.distributed as tdist

    n = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(n) for _ in range(dist.world_size())]
    tdist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    out = []
    for t in tensors:
        pad = torch.zeros((m - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        buf = [torch.empty((m, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in sizes]
        tdist.all_gather(buf, torch.cat([t, pad]).contiguous())
        out.append(torch.cat([b[: int(s)] for b, s in zip(buf, sizes)]))
    return tuple(out)


@_register("pskd")
class PSKD(ParamObjective):
    """PS-KD (Kim et al. 2021): soft targets from the model's own previous-epoch predictions.

    In epoch ``t`` (0-based) the target of sample ``i`` is
    ``(1 − α_t)·onehot(y_i) + α_t·p_{t−1}(i)`` with ``α_t = α_T · t / num_epochs`` (the paper's
    linear schedule), and the loss is the soft cross-entropy ``−Σ_c target_c log softmax(z)_c``
    over labeled rows. ``p_{t−1}(i)`` is the softmax the model gave sample ``i`` at its training
    step in epoch ``t−1`` (on that step's augmented view, as in the official code). Epoch 0, and
    any sample not seen in the previous epoch (e.g. a dropped last batch), use the one-hot label.

    State (all buffers, so checkpoint/resume is exact, even mid-epoch): ``cur_probs``/``cur_seen``
    filled during the epoch, ``prev_probs``/``prev_seen`` read during it, swapped (copied) at
    epoch end; ``epoch`` and ``num_epochs`` give ``α_t``. Memory: ``2·N·C`` values of
    ``store_dtype``. Under DDP every rank gathers all ranks' rows so the buffers stay identical.
    """

    needs_teacher = False

    class Params(_Params):
        alpha_T: float = Field(0.8, ge=0, le=1, description="weight of the previous predictions in the last epoch")
        store_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the prediction buffers")

    def setup(self, student, teachers, num_classes, train_size) -> None:
        if num_classes <= 0 or train_size <= 0:
            raise AttarError(f"objective 'pskd' needs num_classes and train_size > 0, got {num_classes}, {train_size}.")
        dev = self._device(student)
        dt = getattr(torch, self.p.store_dtype)
        self.register_buffer("cur_probs", torch.zeros(train_size, num_classes, dtype=dt, device=dev))
        self.register_buffer("prev_probs", torch.zeros(train_size, num_classes, dtype=dt, device=dev))
        self.register_buffer("cur_seen", torch.zeros(train_size, dtype=torch.bool, device=dev))
        self.register_buffer("prev_seen", torch.zeros(train_size, dtype=torch.bool, device=dev))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long, device=dev))
        self.register_buffer("num_epochs", torch.zeros((), dtype=torch.long, device=dev))

    def alpha_t(self) -> float:
        e, n = int(self.epoch), int(self.num_epochs)
        return self.p.alpha_T * e / n if (e > 0 and n > 0) else 0.0

    def targets(self, y: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``[B, C]`` soft targets for labeled rows (rows with ``y = −1`` get a dummy class 0)."""
        if not hasattr(self, "prev_probs"):
            raise AttarError("objective 'pskd' was not set up: call setup(...) before the first batch.")
        onehot = F.one_hot(y.clamp_min(0), num_classes).float()
        a = self.alpha_t()
        if a == 0.0:
            return onehot
        idx = idx.to(self.prev_probs.device)
        prev = self.prev_probs[idx].float().to(y.device)
        seen = self.prev_seen[idx].to(y.device).unsqueeze(1)
        return torch.where(seen, (1 - a) * onehot + a * prev, onehot)

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        c = logits.shape[1]
        if not hasattr(self, "prev_probs") or self.prev_probs.shape[1] != c:
            raise AttarError(
                f"objective 'pskd': logits have {c} classes but setup() sized the buffers for "
                f"{getattr(self, 'prev_probs', torch.empty(0, 0)).shape[-1]}; call setup with the right num_classes."
            )
        target = self.targets(batch.y, batch.idx, c)
        lab = batch.y >= 0
        logp = torch.log_softmax(logits.float(), dim=-1)
        per = -(target * logp).sum(-1)
        loss = per[lab].mean() if bool(lab.any()) else logits.sum() * 0.0
        if self.training:
            with torch.no_grad():
                idx, probs = _all_gather_rows(batch.idx.to(logits.device), torch.softmax(logits.float(), -1))
                idx = idx.to(self.cur_probs.device)
                self.cur_probs[idx] = probs.to(self.cur_probs.device, self.cur_probs.dtype)
                self.cur_seen[idx] = True
        return {"loss": loss, "alpha_t": torch.tensor(self.alpha_t())}

    def on_epoch_end(self, epoch: int, num_epochs: int) -> None:
        self.prev_probs.copy_(self.cur_probs)
        self.prev_seen.copy_(self.cur_seen)
        self.cur_seen.zero_()
        self.epoch.fill_(epoch + 1)
        self.num_epochs.fill_(num_epochs)


# ----------------------------------------------------------------------------------------------
# DHO: dual-head optimisation
# ----------------------------------------------------------------------------------------------


@_register("dho")
class DHO(KD):
    """DHO (Kang et al. 2025): a second classifier head on the shared penultimate features.

    The student's own final ``nn.Linear`` (head 1, the last Linear or the module path ``head``)
    learns from labels; a twin head owned by the objective (head 2, initialised as a copy, fed
    the same features captured by a forward hook on head 1's input) learns from the teacher:
    ``loss = α·CE(z1, y) + (1−α)·D(p_T ‖ softmax(z2/T))``. Separate heads ease the conflict
    between the two gradients; the backbone receives both.

    Deployment (attar's form): :meth:`finalize` returns a copy of the student whose head is
    ``W = β·W1 + (1−β)·W2``, ``b = β·b1 + (1−β)·b2``. Because each head is linear in the same
    features, the single-head model outputs exactly ``β·z1 + (1−β)·z2`` — a logit-space
    combination at no inference cost (the paper combines the heads' outputs; attar combines
    logits so the result folds into one Linear). Requires head 1 to be the model's last op.
    """

    class Params(_KDParams):
        alpha: float = Field(0.5, ge=0, le=1, description="weight of the CE head; the KD head gets 1 - alpha")
        temperature: float = Field(1.0, gt=0, description=_T_DOC)
        beta: float = Field(0.5, ge=0, le=1, description="deployed head = beta*CE head + (1-beta)*KD head")
        head: str | None = Field(None, description="module path of the student's final Linear (default: the last Linear)")

    def setup(self, student, teachers, num_classes, train_size) -> None:
        self._remove_hooks()
        if self.p.head is None:
            path, h = last_linear(student, "objective 'dho'")
        else:
            path, h = self.p.head, resolve_module(student, self.p.head, "objective 'dho' (field 'head')")
        if not isinstance(h, nn.Linear):
            raise AttarError(f"objective 'dho': head {path!r} is a {type(h).__name__}, not an nn.Linear.")
        if num_classes and h.out_features != num_classes:
            raise AttarError(
                f"objective 'dho': head {path!r} has {h.out_features} outputs but the task has {num_classes} "
                "classes; set field 'head' to the classifier's module path."
            )
        self.head_path = path
        self.head2 = nn.Linear(h.in_features, h.out_features, bias=h.bias is not None,
                               device=h.weight.device, dtype=h.weight.dtype)
        with torch.no_grad():  # initialised as a copy of head 1
            self.head2.weight.copy_(h.weight)
            if h.bias is not None:
                self.head2.bias.copy_(h.bias)
        self._hooks = [Capture(h, "input")]

    def _remove_hooks(self) -> None:
        for c in getattr(self, "_hooks", []):
            c.remove()
        self._hooks = []

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if not getattr(self, "_hooks", None):
            raise AttarError("objective 'dho' was not set up: call setup(...) before the first batch.")
        feats = self._hooks[0].pop()
        if feats is None or feats.shape[0] != logits.shape[0]:
            raise AttarError("objective 'dho': the student's head did not run on this batch (no features captured).")
        z2 = self.head2(feats)
        out = self._kd_losses(batch, logits, z2)
        return out

    def finalize(self, student: nn.Module) -> nn.Module:
        self._remove_hooks()
        model = copy.deepcopy(student)
        h = model.get_submodule(self.head_path)
        b = self.p.beta
        with torch.no_grad():
            h.weight.copy_(b * h.weight + (1 - b) * self.head2.weight.to(h.weight))
            if h.bias is not None:
                h.bias.copy_(b * h.bias + (1 - b) * self.head2.bias.to(h.bias))
        return model


# ----------------------------------------------------------------------------------------------
# Feature KD (hooks + projector) and ND
# ----------------------------------------------------------------------------------------------


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


@_register("feature")
class FeatureKD(KD):
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

    needs_live_teacher = True

    class Params(_KDParams):
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
        self.projector = nn.Linear(ds, dt).to(self._device(student)) if self.p.projector else nn.Identity()
        self._hooks = [Capture(s_mod, "output"), Capture(t_mod, "output")]

    _remove_hooks = DHO._remove_hooks

    def finalize(self, student: nn.Module) -> nn.Module:
        self._remove_hooks()
        return student

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
        if not getattr(self, "_hooks", None):
            raise AttarError("objective 'feature' was not set up: call setup(...) before the first batch.")
        fs, ft = self._hooks[0].pop(), self._hooks[1].pop()
        if ft is None:
            raise AttarError(
                "objective 'feature': the teacher's layer did not run on this batch. Feature KD needs the "
                "teacher run live on the same inputs (turn the teacher cache off: train.teacher_cache: off)."
            )
        if fs is None or fs.shape[0] != logits.shape[0] or ft.shape[0] != logits.shape[0]:
            raise AttarError("objective 'feature': the captured features do not belong to this batch.")
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


@_register("nd")
class ND(KD):
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

    needs_live_teacher = True

    class Params(_KDParams):
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
        dev = self._device(student)
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

    _remove_hooks = DHO._remove_hooks
    finalize = FeatureKD.finalize

    def centers(self) -> torch.Tensor:
        return self.center_sum / self.center_count.clamp_min(1).unsqueeze(1)

    def _accumulate(self, ft: torch.Tensor, cls: torch.Tensor) -> None:
        s = torch.zeros_like(self.center_sum).index_add_(0, cls, ft.to(self.center_sum))
        n = torch.zeros_like(self.center_count).index_add_(0, cls, torch.ones_like(cls, dtype=self.center_count.dtype))
        if dist.world_size() > 1:
            import torch.distributed as tdist

            tdist.all_reduce(s)
            tdist.all_reduce(n)
        self.center_sum += s
        self.center_count += n

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if not getattr(self, "_hooks", None):
            raise AttarError("objective 'nd' was not set up: call setup(...) before the first batch.")
        fs, ft = self._hooks[0].pop(), self._hooks[1].pop()
        if ft is None:
            raise AttarError(
                "objective 'nd': the teacher's head did not run on this batch. ND needs the teacher run live "
                "on the same inputs (turn the teacher cache off: train.teacher_cache: off)."
            )
        if fs is None or fs.shape[0] != logits.shape[0] or ft.shape[0] != logits.shape[0]:
            raise AttarError("objective 'nd': the captured features do not belong to this batch.")
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
