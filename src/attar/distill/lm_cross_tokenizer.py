"""Cross-tokenizer distillation: a teacher and a student that split text into different tokens.

Token-level KD compares two next-token distributions id by id; across tokenizers neither the ids nor the positions
correspond. Two things bridge them, both needing only the *text* both models read:

**Positions, by text spans** (:func:`align_ends`). The student's row is decoded to text, the teacher tokenises
that text with its own tokenizer, and each token's character span is taken from the tokenizers' offsets. Where a
student token and a teacher token *end* at the same character, both models have read exactly the same text, so
their next-token distributions predict the same continuation: those positions are paired (the last token ending
there on each side, so a character split over several byte tokens pairs once). KD is computed on paired positions
only; the others get cross-entropy alone. On fortunes text, SmolLM2 vs Qwen2.5 tokens pair at about 9 in 10
positions (docs/lm.md).

**Distributions** over two vocabularies:

* **ULD** (Universal Logit Distillation, Boizard et al. 2024, :func:`uld_loss`): sort each probability vector in
  decreasing order, pad the shorter with zeros and take the L1 distance, ``Σ_i |p_(i) − q_(i)|`` (the
  Wasserstein-1 distance between the two distributions under a uniform cost, which needs no token mapping). It
  is 0 for any relabelling of the same distribution, so it matches the *shape* of the teacher's distribution,
  not which token carries which mass.
* **GOLD-style hybrid** (:func:`gold_loss`, after TRL's GOLD trainer): tokens whose strings both vocabularies hold
  (:func:`attar.text.vocab_align.shared_token_ids`) are compared exactly, the rest by ULD. With ``m_t``/``m_s``
  the teacher's/student's mass on the shared tokens, ``p̂``/``q̂`` their renormalised shared parts and ``p_r``/``q_r``
  the (unnormalised) rest::

      gold = KL([m_t, 1−m_t] ‖ [m_s, 1−m_s]) + m_t · D(p̂ ‖ q̂) + ULD(p_r, q_r)

  This is the chain rule of the KL divergence (split by shared / not shared) with the rest's term, where tokens
  do not correspond, replaced by ULD; ``D`` is the configured divergence on the shared tokens' logits (its
  temperature convention included; the split term carries the KL family's ``T²``). With one tokenizer every token is shared (``m = 1``, the rest empty), so
  GOLD *is* ordinary token KD. TRL weighs a matched JSD by the shared fraction of the vocabulary instead; the
  chain rule gives that identity and needs no weight to tune.

The teacher's side is chunked like ordinary KD: its hidden states are kept at the paired positions only and its
head runs a chunk of positions at a time inside :class:`attar.distill.lm_task.LMLoss`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attar.distill.divergences import divergence
from attar.errors import AttarError

__all__ = ["CROSS_MODES", "uld_loss", "gold_loss", "SharedVocab", "shared_ids", "align_ends", "token_ends", "RowAlignment",
           "CrossBatch", "CrossTokenizer", "tokenizers_differ"]

CROSS_MODES = ("uld", "gold")


# ---------------------------------------------------------------------------------------------- the losses
def _sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per row ``Σ_i |sort(p)_i − sort(q)_i|`` (both sorted decreasingly, the shorter padded with zeros)."""
    ps = p.sort(dim=-1, descending=True).values
    qs = q.sort(dim=-1, descending=True).values
    width = max(ps.shape[-1], qs.shape[-1])
    ps = F.pad(ps, (0, width - ps.shape[-1]))
    qs = F.pad(qs, (0, width - qs.shape[-1]))
    return (ps - qs).abs().sum(-1)


def _reduce(v: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return v
    if reduction == "sum":
        return v.sum()
    if reduction == "mean":
        return v.mean() if v.numel() else v.sum()
    raise AttarError(f"reduction must be none, sum or mean, got {reduction!r}.")


def uld_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, reduction: str = "mean") -> Tensor:
    """ULD: L1 distance between the sorted probability vectors ``softmax(z/T)`` of student ``[N, Vs]`` and teacher
    ``[N, Vt]`` (the vocabularies may differ in size and order; module doc)."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise AttarError(f"uld_loss: student rows {tuple(student_logits.shape[:-1])} and teacher rows "
                         f"{tuple(teacher_logits.shape[:-1])} differ; align the positions first.")
    q = torch.softmax(student_logits.float() / temperature, dim=-1)
    p = torch.softmax(teacher_logits.float().to(q.device) / temperature, dim=-1)
    return _reduce(_sorted_l1(p, q), reduction)


@dataclass
class SharedVocab:
    """Token ids both vocabularies hold with the same string: ``student[i]`` and ``teacher[i]`` spell the same
    text (one-to-one), over vocabularies of ``student_size`` and ``teacher_size`` tokens."""

    student: Tensor
    teacher: Tensor
    student_size: int
    teacher_size: int
    _rest: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.student = torch.as_tensor(self.student, dtype=torch.long)
        self.teacher = torch.as_tensor(self.teacher, dtype=torch.long)
        keep = (self.student < self.student_size) & (self.teacher < self.teacher_size)
        self.student, self.teacher = self.student[keep], self.teacher[keep]
        if self.student.unique().numel() != self.student.numel() or self.teacher.unique().numel() != self.teacher.numel():
            raise AttarError("shared tokens must pair each student id with one teacher id and back (one-to-one).")

    def __len__(self) -> int:
        return int(self.student.numel())

    @classmethod
    def of(cls, student_tokenizer: Any, teacher_tokenizer: Any, student_size: int, teacher_size: int) -> "SharedVocab":
        s, t = shared_ids(student_tokenizer, teacher_tokenizer)
        return cls(s, t, student_size, teacher_size)

    @classmethod
    def identity(cls, size: int) -> "SharedVocab":
        ids = torch.arange(size)
        return cls(ids, ids.clone(), size, size)

    def rest(self, side: str, device: torch.device) -> Tensor:
        """The ids of ``side`` (student/teacher) outside the shared set."""
        key = (side, str(device))
        if key not in self._rest:
            size, ids = (self.student_size, self.student) if side == "student" else (self.teacher_size, self.teacher)
            keep = torch.ones(size, dtype=torch.bool)
            keep[ids] = False
            self._rest[key] = keep.nonzero().squeeze(1).to(device)
        return self._rest[key]


_SHARED: dict[tuple[int, int], tuple[Any, Any, tuple[Tensor, Tensor]]] = {}


def shared_ids(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[Tensor, Tensor]:
    """:func:`attar.text.vocab_align.shared_token_ids`, computed once per pair of tokenizer objects (reading a
    150k-token vocabulary takes about a second, and the check and the loss both ask)."""
    from attar.text.vocab_align import shared_token_ids

    key = (id(student_tokenizer), id(teacher_tokenizer))
    hit = _SHARED.get(key)
    if hit is not None and hit[0]() is student_tokenizer and hit[1]() is teacher_tokenizer:
        return hit[2]
    pair = shared_token_ids(student_tokenizer, teacher_tokenizer)
    try:
        _SHARED[key] = (weakref.ref(student_tokenizer), weakref.ref(teacher_tokenizer), pair)
    except TypeError:  # an object that takes no weak reference (a dict): not kept
        pass
    return pair


def gold_loss(student_logits: Tensor, teacher_logits: Tensor, shared: SharedVocab, divergence_name: str = "kl",
              temperature: float = 1.0, reduction: str = "mean", **params: Any) -> Tensor:
    """The GOLD-style hybrid (module doc): exact ``divergence_name`` on the shared tokens, ULD on the rest, joined
    by the chain rule of KL. ``student_logits`` ``[N, Vs]``, ``teacher_logits`` ``[N, Vt]``."""
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise AttarError(f"gold_loss: student rows {tuple(student_logits.shape[:-1])} and teacher rows "
                         f"{tuple(teacher_logits.shape[:-1])} differ; align the positions first.")
    if len(shared) == 0:
        return uld_loss(student_logits, teacher_logits, temperature, reduction)
    s = student_logits if student_logits.dtype == torch.float64 else student_logits.float()
    t = teacher_logits.to(device=s.device, dtype=s.dtype)
    dev = s.device
    si, ti = shared.student.to(dev), shared.teacher.to(dev)
    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    rs, rt = shared.rest("student", dev), shared.rest("teacher", dev)

    def log_mass(logp: Tensor, ids: Tensor) -> Tensor:
        if ids.numel() == 0:
            return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
        return torch.logsumexp(logp[:, ids], dim=-1)

    log_ms, log_mt = log_mass(log_q, si), log_mass(log_p, ti)
    log_rs, log_rt = log_mass(log_q, rs), log_mass(log_p, rt)
    m_t, r_t = log_mt.exp(), log_rt.exp()
    # KL of the two-bucket split (shared / rest), 0·log 0 = 0 (and no NaN in the backward pass for an empty bucket)
    split = torch.zeros_like(m_t)
    for mass, lt, ls in ((m_t, log_mt, log_ms), (r_t, log_rt, log_rs)):
        on = mass > 0
        split = split + torch.where(on, mass * (torch.where(on, lt, 0.0) - torch.where(on, ls, 0.0)), 0.0)
    split = split * temperature**2  # the KL family's T² convention (attar.distill.divergences)
    exact = divergence(divergence_name, s[:, si], t[:, ti], temperature, "none", **params)
    total = split + m_t * exact
    if rs.numel() or rt.numel():
        total = total + _sorted_l1(log_p[:, rt].exp(), log_q[:, rs].exp())
    return _reduce(total, reduction)


# ---------------------------------------------------------------------------------------------- positions
def align_ends(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of a student token ``i`` and a teacher token ``j`` that end at the same character, taking the
    last token ending there on each side (module doc). Ends must not decrease along a row."""
    last_s: dict[int, int] = {}
    for i, e in enumerate(student_ends):
        last_s[int(e)] = i
    last_t: dict[int, int] = {}
    for j, e in enumerate(teacher_ends):
        last_t[int(e)] = j
    return [(last_s[e], last_t[e]) for e in sorted(last_s) if e in last_t]


def token_ends(tokenizer: Any, ids: Sequence[int], text: str) -> list[int]:
    """The character at which each of ``ids`` ends in ``text`` (their decoding): from the tokenizer's offsets when
    re-encoding ``text`` gives ``ids`` back, else by decoding growing prefixes (a row cut mid-word re-encodes
    differently)."""
    ids = list(ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            ends, top = [], 0
            for _, e in enc["offset_mapping"]:
                top = max(top, int(e))
                ends.append(top)
            return ends
    ends, top = [], 0
    for k in range(1, len(ids) + 1):
        top = max(top, min(len(text), len(tokenizer.decode(ids[:k]))))
        ends.append(top)
    return ends


@dataclass
class RowAlignment:
    """One row across tokenizers: the teacher's ids for the row's text and the paired positions ``(i, j)`` (student
    token ``i``, teacher token ``j``; both positions predict the text after the same character)."""

    teacher_ids: list[int]
    pairs: list[tuple[int, int]]


@dataclass
class CrossBatch:
    """A batch across tokenizers: the teacher's right-padded ids ``[B, Lt]`` and attention mask, which student
    positions are paired (``student_pos`` ``[B, L-1]``) and the teacher positions they pair with
    (``teacher_pos`` ``[B, Lt-1]``; the k-th True of both, row-major, are a pair)."""

    teacher_ids: Tensor
    attention: Tensor
    student_pos: Tensor
    teacher_pos: Tensor


def _vocab_dict(tok: Any) -> dict[str, int]:
    return dict(tok.get_vocab())


def tokenizers_differ(student_tokenizer: Any, teacher_tokenizer: Any) -> bool:
    """Whether the two tokenizers give some token another id (then token-level KD cannot compare id by id)."""
    return _vocab_dict(student_tokenizer) != _vocab_dict(teacher_tokenizer)


class CrossTokenizer:
    """Everything a cross-tokenizer batch needs: the two tokenizers, the loss (``mode``: uld or gold), the shared
    tokens (gold), the teacher's pad id and the alignment of each training row, kept once made (module doc)."""

    def __init__(self, mode: str, student_tokenizer: Any, teacher_tokenizer: Any, student_size: int,
                 teacher_size: int, shared: SharedVocab | None = None):
        if mode not in CROSS_MODES:
            raise AttarError(f"cross_tokenizer must be one of {', '.join(CROSS_MODES)}, got {mode!r}.")
        if not getattr(student_tokenizer, "is_fast", False) or not getattr(teacher_tokenizer, "is_fast", False):
            raise AttarError("cross-tokenizer KD aligns tokens by their character offsets, which only fast "
                             "(Rust) Hugging Face tokenizers give; load both tokenizers with use_fast=True.")
        self.mode, self.stok, self.ttok = mode, student_tokenizer, teacher_tokenizer
        self.student_size, self.teacher_size = int(student_size), int(teacher_size)
        if mode == "gold" and shared is None:
            shared = SharedVocab.of(student_tokenizer, teacher_tokenizer, self.student_size, self.teacher_size)
        self.shared = shared
        self.teacher_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else (
            teacher_tokenizer.eos_token_id or 0)
        self._special = self._special_map()
        self._rows: dict[int, RowAlignment] = {}

    def describe(self) -> str:
        extra = f", {len(self.shared):,} shared token strings" if self.shared is not None else ""
        return (f"cross-tokenizer {self.mode} (student vocabulary {self.student_size:,}, teacher "
                f"{self.teacher_size:,}{extra}; positions paired by text spans)")

    # ------------------------------------------------------------------------------------------ rows
    def _special_map(self) -> dict[int, int | None]:
        """Student special id -> the teacher's token with the same string, else the teacher's token of the same role
        (bos/eos/pad), else None (the teacher reads nothing there)."""
        tv = _vocab_dict(self.ttok)
        out: dict[int, int | None] = {}
        roles = {}
        for role in ("bos", "eos", "pad"):
            sid = getattr(self.stok, f"{role}_token_id", None)
            if sid is not None:
                roles.setdefault(int(sid), getattr(self.ttok, f"{role}_token_id", None))
        for sid in self.stok.all_special_ids:
            name = self.stok.convert_ids_to_tokens(int(sid))
            out[int(sid)] = tv.get(name, roles.get(int(sid)))
        return out

    def align_row(self, ids: Sequence[int]) -> RowAlignment:
        """The teacher's ids and the paired positions for one student row (its real tokens, no padding)."""
        s_ends: list[int] = []
        t_ids: list[int] = []
        t_ends: list[int] = []
        run: list[int] = []
        at = 0  # characters so far; a special token the teacher also reads takes one (virtual) character

        def flush():
            nonlocal at, run
            if not run:
                return
            text = self.stok.decode(run, clean_up_tokenization_spaces=False)
            s_ends.extend(at + e for e in token_ends(self.stok, run, text))
            enc = self.ttok(text, add_special_tokens=False, return_offsets_mapping=True)
            top = 0
            for tid, (_, e) in zip(enc["input_ids"], enc["offset_mapping"]):
                top = max(top, int(e))
                t_ids.append(int(tid))
                t_ends.append(at + top)
            at += len(text)
            run = []

        for tid in ids:
            tid = int(tid)
            if tid in self._special:
                flush()
                mapped = self._special[tid]
                if mapped is not None:
                    at += 1
                    t_ids.append(int(mapped))
                    t_ends.append(at)
                s_ends.append(at)
            else:
                run.append(tid)
        flush()
        return RowAlignment(t_ids, align_ends(s_ends, t_ends))

    def align_batch(self, ids: Tensor, mask: Tensor, keys: Sequence[int | None] | None = None) -> CrossBatch:
        """:class:`CrossBatch` for right-padded student rows ``ids`` ``[B, L]`` with response ``mask``: a row's real
        tokens end at its last response token; a row with a key (its training index) is aligned once and kept."""
        B, L = ids.shape
        aligned: list[RowAlignment] = []
        has = mask.bool().any(1)
        last = torch.where(has, L - 1 - mask.bool().flip(1).int().argmax(1), torch.zeros(B, dtype=torch.long))
        for b in range(B):
            key = keys[b] if keys is not None else None
            if key is not None and key in self._rows:
                aligned.append(self._rows[key])
                continue
            n = int(last[b]) + 1 if bool(has[b]) else 0
            ra = self.align_row(ids[b, :n].tolist())
            if key is not None:
                self._rows[key] = ra
            aligned.append(ra)
        width = max(2, max((len(a.teacher_ids) for a in aligned), default=2))
        t_ids = torch.full((B, width), int(self.teacher_pad), dtype=torch.long)
        attn = torch.zeros(B, width, dtype=torch.long)
        s_pos = torch.zeros(B, max(L - 1, 0), dtype=torch.bool)
        t_pos = torch.zeros(B, width - 1, dtype=torch.bool)
        for b, a in enumerate(aligned):
            if a.teacher_ids:
                t_ids[b, : len(a.teacher_ids)] = torch.tensor(a.teacher_ids)
                attn[b, : len(a.teacher_ids)] = 1
            for i, j in a.pairs:
                if i < L - 1 and j < width - 1:
                    s_pos[b, i] = True
                    t_pos[b, j] = True
        return CrossBatch(t_ids, attn, s_pos, t_pos)

    def restrict(self, cb: CrossBatch, scored: Tensor) -> CrossBatch:
        """Keep only the pairs whose student position is scored (``scored`` ``[B, L-1]``)."""
        keep_t = torch.zeros_like(cb.teacher_pos)
        for b in range(cb.student_pos.shape[0]):
            s_idx = cb.student_pos[b].nonzero().squeeze(1)
            t_idx = cb.teacher_pos[b].nonzero().squeeze(1)
            sel = scored[b, s_idx]
            keep_t[b, t_idx[sel]] = True
        return CrossBatch(cb.teacher_ids, cb.attention, cb.student_pos & scored, keep_t)

    # ------------------------------------------------------------------------------------------ the loss
    def loss(self, student_logits: Tensor, teacher_logits: Tensor, divergence_name: str, temperature: float,
             reduction: str = "none", **params: Any) -> Tensor:
        """Per paired position: ULD, or GOLD with ``divergence_name`` on the shared tokens."""
        s = student_logits[..., : self.student_size]
        t = teacher_logits[..., : self.teacher_size]
        if self.mode == "uld":
            return uld_loss(s, t, temperature, reduction)
        return gold_loss(s, t, self.shared, divergence_name, temperature, reduction, **params)

    def teacher_rows(self, split: Any, chunk: int = 256) -> Any:
        """The teacher's own rows of a training split, as an ``LMSplit`` whose scored positions are the teacher
        positions paired with a scored student position: what ``attar teacher dump --student-tokenizer`` stores, so
        a stored teacher can feed cross-tokenizer KD (its row ``r`` is the training row ``r``). The alignments are
        kept under the rows' indices, as training keeps them."""
        from attar.text.lm_split import LMSplit

        parts = []
        for a in range(0, len(split), chunk):
            part = split.slice(a, min(a + chunk, len(split)))
            cb = self.restrict(self.align_batch(part.ids, part.mask, list(range(a, a + len(part)))),
                               part.mask[:, 1:].bool())
            parts.append(cb)
        width = max(cb.teacher_ids.shape[1] for cb in parts)
        ids = torch.cat([F.pad(cb.teacher_ids, (0, width - cb.teacher_ids.shape[1]), value=int(self.teacher_pad))
                         for cb in parts])
        mask = torch.cat([F.pad(torch.cat([torch.zeros(len(cb.teacher_pos), 1, dtype=torch.bool), cb.teacher_pos], 1),
                                (0, width - cb.teacher_ids.shape[1])) for cb in parts])
        return LMSplit(ids, mask, torch.zeros(len(ids), dtype=torch.long))

    def pairing_rate(self, split: Any, rows: int = 256) -> float:
        """Fraction of the scored positions of the first ``rows`` rows of ``split`` that pair with a teacher
        position (the rest get no KD)."""
        part = split.slice(0, min(rows, len(split)))
        cb = self.align_batch(part.ids, part.mask)
        scored = part.mask[:, 1:].bool()
        n = int(scored.sum())
        return float((cb.student_pos & scored).sum()) / n if n else 0.0
