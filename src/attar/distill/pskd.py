"""PS-KD (Kim et al. 2021): progressive self-knowledge distillation, the model's own previous-epoch
predictions as soft targets. No teacher; all state is buffers, so resume is exact."""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from pydantic import Field

from attar.errors import AttarError
from attar.registry import Params
from attar.train import distributed as dist
from attar.train.objective import Batch, Objective, device_of, register

__all__ = ["PSKD"]


def _all_gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenate equal-first-dim tensors from every rank (variable row counts); identity if not distributed."""
    if dist.world_size() == 1:
        return tensors
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


@register("pskd")
class PSKD(Objective):
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

    class Params(Params):
        alpha_T: float = Field(0.8, ge=0, le=1, description="weight of the previous predictions in the last epoch")
        store_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the prediction buffers")

    def setup(self, student, teachers, num_classes, train_size) -> None:
        if num_classes <= 0 or train_size <= 0:
            raise AttarError(f"objective 'pskd' needs num_classes and train_size > 0, got {num_classes}, {train_size}.")
        dev = device_of(student)
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
