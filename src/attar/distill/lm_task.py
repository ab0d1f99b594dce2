"""The language-model task: causal LMs on the one Trainer (SFT, token KD, on-policy GKD), logits in chunks.

:class:`LMTask` plugs token sequences into :class:`attar.train.trainer.Trainer`, which then gives language
models what every other route has: checkpoints and exact resume, DDP, gradient accumulation, ``train.device``
and ``train.dtype``, the NaN guard and graceful stops. The task turns rows of an
:class:`~attar.text.charlm.LMSplit` into a batch (replacing a fraction λ of them with the student's own
continuations when on-policy, and fetching the teacher's view of the batch from the top-k cache or the live
teacher); :class:`LMLoss` turns the batch into ``α·CE + (1−α)·KD``; :class:`LMMonitor` (a callback) measures
held-out perplexity every ``eval_every`` steps, keeps the best weights and watches for teacher hacking
(:mod:`attar.distill.lm_monitor`).

**Logits in chunks.** A real vocabulary (150k–262k tokens) makes ``[batch, length, vocab]`` logits the largest
tensor of a step, and KD needs the teacher's too. So the task runs each model only up to its last hidden
state, keeps the scored positions (response tokens; prompt and padding never reach the head), and
:class:`LMLoss` applies the output head to ``chunk_tokens`` positions at a time under activation
checkpointing (automatic: whole while a batch's logits stay under 256 MiB, 64 MiB chunks beyond): the forward keeps no logits, the backward recomputes one chunk's. Teacher and student logits
of a whole batch never exist at once, and the loss equals the unchunked one in value and gradient (the
sums are the same sums, regrouped). A model whose head cannot be split off this way (checked once, on a few
tokens, against its own ``logits``) runs whole, as before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attar.distill.divergences import divergence, is_batchwise
from attar.distill.lm_cross_tokenizer import CrossTokenizer
from attar.distill.lm_objectives import LMTeacherCache, TopK, VocabMap, _bucketise
from attar.distill.lm_sampling import sample_continuations, trim_padding
from attar.errors import AttarError
from attar.rng import generator
from attar.text.charlm import LMSplit
from attar.train.objective import Batch, Objective, device_of
from attar.train.task import Task

#: When ``chunk_tokens`` is automatic: a batch whose logits hold at most AUTO_WHOLE_ELEMENTS values (256 MiB of
#: float32) runs whole, with no recomputation; a larger one in chunks of AUTO_CHUNK_ELEMENTS values (64 MiB, about
#: 64 positions of a 262k vocabulary).
AUTO_WHOLE_ELEMENTS = 2**26
AUTO_CHUNK_ELEMENTS = 2**24


# ---------------------------------------------------------------------------------------------- running a model
class HeadSplit:
    """A causal LM run as ``hidden = body(ids)`` then ``logits = head(hidden)``: the cut chunked losses need."""

    def __init__(self, model: nn.Module):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
        prefix = getattr(inner, "base_model_prefix", "")
        self.model = model
        self.body = getattr(inner, prefix, None) if prefix else None
        self.head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        self.softcap = getattr(getattr(inner, "config", None), "final_logit_softcapping", None)
        self.ok = self.body is not None and self.head is not None and self.body is not inner
        self._verified: bool | None = None

    def at(self, ids: Tensor, attn: Tensor | None, pos: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """The model's rows at scored positions ``pos`` (``[B, L-1]``) and the function that makes them logits: last
        hidden states and the head when the split reproduces the model (checked once), else its logits as they are."""
        if self._verified is None:
            self._verified = self.verify()
        if self._verified:
            return self.hidden(ids, attn)[:, :-1][pos], self.logits
        return self.full_logits(ids, attn)[:, :-1][pos], _identity

    def width(self, rows: Tensor, head: Callable[[Tensor], Tensor]) -> int:
        """How many logits a row of :meth:`at` becomes (the head's rows, or the logits' own width)."""
        return int(self.head.weight.shape[0]) if head is not _identity else int(rows.shape[-1])

    def hidden(self, ids: Tensor, attn: Tensor | None) -> Tensor:
        out = self.body(input_ids=ids, attention_mask=attn)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: Tensor) -> Tensor:
        z = _at_least_float32(self.head(hidden))
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def full_logits(self, ids: Tensor, attn: Tensor | None) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=attn)
        return _at_least_float32(out.logits if hasattr(out, "logits") else out)

    @torch.no_grad()
    def verify(self, vocab_guard: int | None = None) -> bool:
        """True when body + head reproduce the model's own logits on a few tokens (else run models whole)."""
        if not self.ok:
            return False
        was = self.model.training
        self.model.eval()
        try:
            dev = device_of(self.model)
            v = vocab_guard or self.head.weight.shape[0]
            ids = (torch.arange(8, device=dev) * 7919 % max(1, v)).unsqueeze(0)
            want = self.full_logits(ids, None)
            got = self.logits(self.hidden(ids, None))
            return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-4, atol=1e-4))
        except Exception:  # an architecture whose body needs other inputs: run it whole
            return False
        finally:
            self.model.train(was)


_SPLITS: "weakref.WeakKeyDictionary[nn.Module, HeadSplit]" = weakref.WeakKeyDictionary()


def head_split(model: nn.Module) -> HeadSplit:
    """The :class:`HeadSplit` of ``model``, made (and checked against the model's logits) once per model."""
    if model not in _SPLITS:
        _SPLITS[model] = HeadSplit(model)
    return _SPLITS[model]


def _identity(z: Tensor) -> Tensor:
    return z


def _at_least_float32(z: Tensor) -> Tensor:
    """Losses in float32 or better: half-precision logits are upcast, float64 (exactness tests) kept."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def scored(mask: Tensor) -> Tensor:
    """``[B, L-1]``: position ``t`` is scored when token ``t+1`` is a response token."""
    return mask[:, 1:].bool()


def auto_chunk(vocab: int, chunk_tokens: int | None, n_tokens: int) -> int:
    """Positions per chunk of ``n_tokens`` scored positions: ``chunk_tokens`` when set (0 = all at once), else all
    at once while the logits stay under AUTO_WHOLE_ELEMENTS, and AUTO_CHUNK_ELEMENTS / vocab positions beyond."""
    if chunk_tokens is not None:
        return chunk_tokens or max(1, n_tokens)
    if n_tokens * max(1, vocab) <= AUTO_WHOLE_ELEMENTS:
        return max(1, n_tokens)
    return max(1, AUTO_CHUNK_ELEMENTS // max(1, vocab))


# ---------------------------------------------------------------------------------------------- the batch
@dataclass
class LMBatch(Batch):
    """Token rows (``x``: ids ``[B, L]``, ``y``: prompt lengths) with what the loss needs per scored token.

    Scored tokens are taken row-major (``scored(mask)``); per token: ``targets`` (next token ids),
    ``ground_truth`` (False on the student's own on-policy rows: no CE there) and the teacher's view, from
    the cache (``from_cache`` tokens, ``cached``: TopK rows) or live (the other tokens, ``teacher_hidden``
    rows or ``teacher_logits`` rows when the teacher runs whole)."""

    mask: Tensor | None = None
    on_policy: Tensor | None = None
    targets: Tensor | None = None
    ground_truth: Tensor | None = None
    from_cache: Tensor | None = None
    cached: TopK | None = None
    teacher_hidden: Tensor | None = None
    kd_tokens: Tensor | None = None  # cross-tokenizer: which scored tokens pair with a teacher position (get KD)


class LMTask(Task):
    """Rows of an LMSplit on the Trainer (module doc). ``teacher``/``cache``/``vmap`` as in ``distill_lm``."""

    def __init__(self, split: LMSplit, pad_id: int, eos_id: int | None, *, alpha: float, divergence_name: str,
                 temperature: float, divergence_args: dict, on_policy: float = 0.0, sample_temperature: float = 1.0,
                 teacher: nn.Module | None = None, cache: LMTeacherCache | None = None, vmap: VocabMap | None = None,
                 teacher_pad_id: int | None = None, chunk_tokens: int | None = None,
                 cross: CrossTokenizer | None = None):
        self.split, self.pad_id, self.eos_id = split, pad_id, eos_id
        self.cross = cross  # teacher with another tokenizer: its own rows, positions paired by text spans
        self.alpha, self.divergence_name, self.temperature = alpha, divergence_name, temperature
        self.divergence_args, self.on_policy, self.sample_temperature = dict(divergence_args), on_policy, sample_temperature
        self.teacher, self.cache, self.vmap, self.teacher_pad_id = teacher, cache, vmap, teacher_pad_id
        self.external_input = bool(getattr(cache, "external", False))  # a served teacher (attar.distill.lm_served)
        self.chunk_tokens = chunk_tokens

    @property
    def needs_teacher(self) -> bool:
        return self.alpha < 1

    @property
    def vocab(self) -> int | None:
        return self.vmap.student_size if self.vmap is not None else None

    def spec(self) -> dict:
        return {"lm": {"alpha": self.alpha, "divergence": self.divergence_name, "temperature": self.temperature,
                       "divergence_args": self.divergence_args, "on_policy": self.on_policy,
                       "sample_temperature": self.sample_temperature, "cache": self.cache is not None}}

    # -------------------------------------------------------------------------------------- rows -> batch
    def batch(self, trainer, rows: Tensor, epoch: int, micro: int) -> LMBatch:
        part = self.split.rows(rows)
        ids, mask = part.ids, part.mask
        on_rows = torch.zeros(len(rows), dtype=torch.bool)
        n_on = int(round(self.on_policy * len(rows))) if self.on_policy > 0 else 0
        if n_on:
            step = epoch * trainer.steps_per_epoch + micro // trainer.accumulate
            g = generator(trainer.seed, 2, step)
            pick = torch.randperm(len(rows), generator=g)[:n_on]
            on_rows[pick] = True
            gen = sample_continuations(trainer.model, part.rows(pick), self.pad_id, self.eos_id,
                                       self.sample_temperature, g, vocab_size=self.vocab)
            ids, mask = ids.clone(), mask.clone()
            ids[pick], mask[pick] = gen.ids, gen.mask
        ids, mask = trim_padding(ids, mask, self.pad_id)
        pos = scored(mask)
        row_of = torch.arange(len(rows)).unsqueeze(1).expand_as(pos)[pos]
        b = LMBatch(x=ids.to(trainer.device), y=part.prompt_len, idx=rows, mask=mask, on_policy=on_rows,
                    targets=ids[:, 1:][pos], ground_truth=~on_rows[row_of])
        if not self.needs_teacher:
            return b
        if self.cross is not None:
            return self._cross_batch(trainer, b, ids, mask, pos, rows, on_rows)
        from_cache = torch.zeros(len(row_of), dtype=torch.bool)
        if self.cache is not None:
            from_cache = ~on_rows[row_of]
            if bool(from_cache.any()):
                tk = self.cache.get(rows, ids.shape[1]).select(
                    torch.cat([pos, torch.zeros(len(rows), 1, dtype=torch.bool)], 1) & ~on_rows.unsqueeze(1))
                dev = trainer.device  # the loss indexes these rows with tensors on the model's device
                b.cached = TopK(tk.values.to(dev), tk.index.to(dev), tk.rest.to(dev), tk.vocab_size, tk.temperature)
        b.from_cache = from_cache
        live_rows = torch.unique(row_of[~from_cache])
        if len(live_rows):
            b.teacher_hidden, b.teacher_logits = self._teacher_view(trainer, ids[live_rows], pos[live_rows])
        return b

    @torch.no_grad()
    def _teacher_view(self, trainer, ids: Tensor, pos: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The live teacher on ``ids`` at the scored positions: hidden states (chunked head) or logits."""
        t_ids = self.vmap.teacher_ids(ids) if not self.vmap.identity else ids
        if not self.vmap.identity:  # padding is never scored; the teacher reads its own pad id there
            t_ids = torch.where(ids == self.pad_id, torch.as_tensor(self.teacher_pad_id or 0), t_ids)
        dev = device_of(self.teacher)
        attn = (ids != self.pad_id).long().to(dev)
        rows, head = head_split(self.teacher).at(t_ids.to(dev), attn, pos.to(dev))
        if head is _identity:
            return None, self.vmap.to_student(rows).to(trainer.device)
        return rows.to(trainer.device), None

    @torch.no_grad()
    def _cross_batch(self, trainer, b: LMBatch, ids: Tensor, mask: Tensor, pos: Tensor, rows: Tensor,
                     on_rows: Tensor) -> LMBatch:
        """The teacher reads each row's text in its own tokens; KD on the scored positions paired by text spans
        (training rows aligned once, on-policy rows every time)."""
        keys = [None if bool(o) else int(r) for r, o in zip(rows.tolist(), on_rows)]
        cb = self.cross.restrict(self.cross.align_batch(ids, mask, keys), pos)
        b.kd_tokens = cb.student_pos[pos]
        b.from_cache = torch.zeros(len(b.kd_tokens), dtype=torch.bool)
        if bool(cb.teacher_pos.any()) and self.teacher is None:  # served or stored: its top-k, completed evenly
            pos_t = torch.cat([cb.teacher_pos, torch.zeros(len(cb.teacher_pos), 1, dtype=torch.bool)], 1)  # [B, W]
            tk = (self.cache.topk_rows(cb.teacher_ids, cb.attention) if hasattr(self.cache, "topk_rows")
                  else self.cache.get(rows, cb.teacher_ids.shape[1])).select(pos_t)
            b.teacher_logits = tk.dense_logits().to(trainer.device)
        elif bool(cb.teacher_pos.any()):
            dev = device_of(self.teacher)
            t_rows, head = head_split(self.teacher).at(cb.teacher_ids.to(dev), cb.attention.to(dev),
                                                       cb.teacher_pos.to(dev))
            if head is _identity:
                b.teacher_logits = t_rows.to(trainer.device)
            else:
                b.teacher_hidden = t_rows.to(trainer.device)
        return b

    # -------------------------------------------------------------------------------------- batch -> losses
    def forward(self, model: nn.Module, objective: Objective, batch: LMBatch) -> tuple[dict[str, Tensor], None]:
        split = head_split(model)
        ids = batch.x
        rows, head = split.at(ids, (ids != self.pad_id).long(), scored(batch.mask).to(ids.device))
        return objective(batch, ScoredRows(rows, head, self.vocab or split.width(rows, head), self)), None

    def teacher_logits_of(self, batch: LMBatch, live: slice | Tensor) -> Tensor:
        """The live teacher's logits over the student's vocabulary for live tokens ``live``."""
        if batch.teacher_hidden is None:
            return batch.teacher_logits[live]
        z = head_split(self.teacher).logits(batch.teacher_hidden[live])
        return z if self.cross is not None else self.vmap.to_student(z)


class ScoredRows(NamedTuple):
    """What the LM task hands its loss: the student's rows at the scored positions, the function that makes them
    logits, how many logits that is, and the task (for the teacher's view of the batch)."""

    rows: Tensor
    head: Callable[[Tensor], Tensor]
    width: int
    task: LMTask


# ---------------------------------------------------------------------------------------------- the loss
class LMLoss(Objective):
    """``α·CE + (1−α)·KD`` over the scored tokens of an :class:`LMBatch`, the head applied in chunks.

    CE is the mean over ground-truth tokens, KD the mean over all scored tokens (on-policy ones included),
    exactly as the unchunked :func:`~attar.distill.lm_objectives.token_ce_loss` and
    :func:`~attar.distill.lm_objectives.token_kd_loss`; with no scored token both are 0 (kept on the graph)."""

    def __init__(self, alpha: float, divergence_name: str = "kl", temperature: float = 1.0,
                 divergence_args: dict | None = None, chunk_tokens: int | None = None):
        super().__init__()
        self.alpha, self.divergence_name, self.temperature = alpha, divergence_name, temperature
        self.divergence_args = dict(divergence_args or {})
        self.chunk_tokens = chunk_tokens
        self.needs_teacher = alpha < 1
        if is_batchwise(divergence_name) and chunk_tokens:
            raise AttarError(f"divergence {divergence_name!r} compares all scored tokens as one set, so its logits "
                             "cannot be split into chunks; set chunk_tokens: 0 (or leave it automatic).")

    def forward(self, batch: LMBatch, outputs: ScoredRows) -> dict[str, Tensor]:
        h, head, vocab, task = outputs
        n = h.shape[0]
        zero = h.sum() * 0.0
        if n == 0:
            return {"loss": zero}
        chunk = n if is_batchwise(self.divergence_name) else auto_chunk(vocab, self.chunk_tokens, n)
        gt = batch.ground_truth.to(h.device)
        targets = batch.targets.to(h.device)
        n_gt = int(gt.sum())
        want_ce, want_kd = self.alpha > 0 and n_gt > 0, self.alpha < 1
        from_cache = batch.from_cache.to(h.device) if want_kd else None
        kd_on = batch.kd_tokens.to(h.device) if want_kd and batch.kd_tokens is not None else None
        live = (~from_cache if kd_on is None else ~from_cache & kd_on) if want_kd else None
        live_index = (torch.cumsum(live.long(), 0) - 1) if want_kd else None
        cache_index = (torch.cumsum(from_cache.long(), 0) - 1) if want_kd else None

        def part(hc: Tensor, start: int) -> tuple[Tensor, Tensor]:
            z = head(hc)
            if task.vocab is not None:
                z = z[:, : task.vocab]
            sl = slice(start, start + hc.shape[0])
            ce = kd = z.sum() * 0.0
            if want_ce:
                g = gt[sl]
                if bool(g.any()):
                    ce = nn.functional.cross_entropy(z[g], targets[sl][g], reduction="sum")
            if want_kd:
                kd = self._kd_sum(z, batch, task, from_cache[sl], live[sl], live_index[sl], cache_index[sl])
            return ce, kd

        ce_sum, kd_sum = zero, zero
        many = chunk < n
        for start in range(0, n, chunk):
            hc = h[start : start + chunk]
            ce, kd = checkpoint(part, hc, start, use_reentrant=False) if many and torch.is_grad_enabled() \
                else part(hc, start)
            ce_sum, kd_sum = ce_sum + ce, kd_sum + kd
        losses: dict[str, Tensor] = {}
        loss = zero
        if self.alpha > 0:
            ce = ce_sum / max(1, n_gt)
            loss = loss + self.alpha * ce
            losses["ce"] = ce.detach()
        if want_kd:
            n_kd = n if kd_on is None else max(1, int(kd_on.sum()))  # cross-tokenizer: the paired tokens
            kd = kd_sum if is_batchwise(self.divergence_name) else kd_sum / n_kd
            loss = loss + (1 - self.alpha) * kd
            losses["kd"] = kd.detach()
        losses["loss"] = loss
        return losses

    def _kd_sum(self, z: Tensor, batch: LMBatch, task: LMTask, from_cache: Tensor, live: Tensor, live_index: Tensor,
                cache_index: Tensor) -> Tensor:
        """Sum over this chunk's tokens of the divergence (batch-wise divergences: token-weighted means)."""
        name, T, args = self.divergence_name, self.temperature, self.divergence_args
        batchwise = is_batchwise(name)
        total = z.sum() * 0.0
        n_all = max(1, int(batch.from_cache.numel()))
        if bool(from_cache.any()):
            c = cache_index[from_cache]
            topk = TopK(batch.cached.values[c], batch.cached.index[c], batch.cached.rest[c], batch.cached.vocab_size,
                        batch.cached.temperature)
            s, t = _bucketise(z[from_cache], topk, T)
            total = total + (divergence(name, s, t, T, "mean", **args) * (len(c) / n_all) if batchwise
                             else divergence(name, s, t, T, "none", **args).sum())
        if bool(live.any()):
            t = task.teacher_logits_of(batch, live_index[live]).to(z.device)
            s = z[live]
            if getattr(task, "cross", None) is not None:
                return total + task.cross.loss(s, t, name, T, "none", **args).sum()
            total = total + (divergence(name, s, t, T, "mean", **args) * (int(live.sum()) / n_all) if batchwise
                             else divergence(name, s, t, T, "none", **args).sum())
        return total

