"""DHO (Kang et al. 2025): dual-head optimisation, a second classifier head that learns from the teacher while
the student's own head learns from the labels; folded into one head for deployment."""

from __future__ import annotations

import copy

import torch
from pydantic import Field
from torch import nn

from attar.distill.feature import HookedKD
from attar.distill.hooks import Capture, last_linear, resolve_module
from attar.distill.kd import T_DOC, KDParams
from attar.errors import AttarError
from attar.train.objective import Batch, register

__all__ = ["DHO"]


@register("dho")
class DHO(HookedKD):
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

    needs_live_teacher = False  # the hook is on the student only: cached teacher logits serve

    class Params(KDParams):
        alpha: float = Field(0.5, ge=0, le=1, description="weight of the CE head; the KD head gets 1 - alpha")
        temperature: float = Field(1.0, gt=0, description=T_DOC)
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

    def forward(self, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        (feats,) = self._captured()
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
