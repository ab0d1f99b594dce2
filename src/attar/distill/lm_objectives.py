"""Token-level distillation losses for causal LMs, a per-token top-k teacher cache, and the vocabulary check.

**Positions.** Logits ``[B, L, V]`` at position ``t`` predict token ``t + 1``. A loss over ids
``[B, L]`` with response mask ``[B, L]`` (True on the tokens to score, see
:mod:`attar.text.charlm`) uses ``logits[:, :-1]`` at the positions where ``mask[:, 1:]`` is True:
prompt tokens and padding never contribute.

**Token KD** (:func:`token_kd_loss`): at every scored position the teacher's and the student's next-
token distributions are compared with any divergence of :data:`attar.distill.divergences.DIVERGENCES`
(forward/reverse KL, JS, generalised JSD β, skew KL, TVD, Sinkhorn, ...), at temperature ``T`` with the
registry's conventions (``T²`` on the KL family). The loss is the mean over all scored tokens of the
batch (every response token weighs the same, long responses weigh more). ``sinkhorn_batch`` has no
per-token value: it compares the batch's scored positions as one set.

**Top-k cache** (:class:`LMTeacherCache`): per position the teacher's top-k log-probabilities at the
cache temperature ``τ`` (float16), their token ids (int16 for V <= 32767) and, in float32, the log of
the tail mass ``r = log(1 − Σ_topk p)``. The divergence is then taken on **k + 1 buckets** ("top-k +
tail bucket"): the teacher's ``[p_1..p_k, 1 − Σ p_i]`` against the student's probabilities of the
*same k tokens* and the student's total mass on all other tokens. Both sides are proper
distributions; merging tokens can only lower an f-divergence (data-processing inequality), so the
cached loss is a lower bound of the full one that is **exact when k = V** (the tail is empty and
dropped). It is not the "renormalised top-k" variant, which would ignore how much mass the student
leaks outside the teacher's top-k. The cache is exact only at ``T = τ``; another temperature is refused.

**Vocabulary check** (:func:`check_vocab`): token-level KD compares distributions over token ids, so
teacher and student must give every token the same id. Different tokenizers then say which mode applies:
with ``cross_tokenizer`` ``auto`` (the LM route's default) they switch to cross-tokenizer KD (GOLD, see
:mod:`attar.distill.lm_cross_tokenizer`), with ``uld``/``gold`` that mode is used even for one tokenizer, and
with ``off`` (ordinary token KD asked for explicitly) or where a caller has no cross-tokenizer route they are
refused, before any training, naming both sizes, the shared token strings and ``train.cross_tokenizer``. A
``token_map`` (student id → teacher id) makes ordinary KD legal across vocabularies: the teacher reads the
student's text through the map and its logits are gathered onto the student's vocabulary (unmapped student
tokens get probability 0 under the teacher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from attar.checkpoint import atomic_save_safetensors, load_safetensors
from attar.distill.divergences import divergence, is_batchwise
from attar.distill.teacher_cache import model_hash, tensor_hash
from attar.errors import AttarError
from attar.text.lm_split import LMSplit

__all__ = ["TopK", "LMTeacherCache", "VocabMap", "check_vocab", "token_kd_loss", "token_ce_loss", "scored_positions",
           "lm_logits", "teacher_lm_logits"]

CACHE_FORMAT = "attar-lm-teacher-cache/1"
_LOG_FLOOR = -1e4


def scored_positions(mask: Tensor) -> Tensor:
    """``[B, L-1]`` bool: logits position ``t`` is scored when token ``t+1`` is a response token."""
    if mask.dim() != 2:
        raise AttarError(f"the response mask must be [batch, length], got {tuple(mask.shape)}.")
    return mask[:, 1:].bool()


@dataclass
class TopK:
    """Per-position teacher top-k: ``values`` log-probs at ``temperature`` ``[..., k]``, ``index`` ``[..., k]``,
    ``rest`` = log tail mass ``[...]``, over a vocabulary of ``vocab_size`` tokens."""

    values: Tensor
    index: Tensor
    rest: Tensor
    vocab_size: int
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return int(self.index.shape[-1])

    def select(self, pos: Tensor) -> "TopK":
        """The rows at boolean positions ``pos`` (``[B, L']`` over the leading dims)."""
        return TopK(self.values[pos], self.index[pos], self.rest[pos], self.vocab_size, self.temperature)

    def dense_logits(self) -> Tensor:
        """``[..., vocab_size]`` logits ``z`` with ``softmax(z / T)`` = the top-k probabilities at their ids and the
        tail mass spread evenly over the other ids (the maximum-entropy completion): for losses that compare whole
        distributions (cross-tokenizer KD from a served teacher)."""
        v, k = self.vocab_size, self.k
        fill = (self.rest.float() - math.log(v - k)) if k < v else torch.full_like(self.rest.float(), float("-inf"))
        logp = fill.unsqueeze(-1).expand(*self.rest.shape, v).clone()
        logp.scatter_(-1, self.index.long(), self.values.float())
        return logp * self.temperature

    @classmethod
    def from_logits(cls, logits: Tensor, k: int, temperature: float = 1.0) -> "TopK":
        """Top-k of ``log_softmax(logits / τ)`` along the last dim, kept in float32 (no rounding)."""
        v = logits.shape[-1]
        if not 1 <= k <= v:
            raise AttarError(f"top-k cache: k must be in [1, {v}] (the vocabulary size), got {k}.")
        logp = torch.log_softmax(logits.detach().float() / temperature, dim=-1)
        top, ind = logp.topk(k, dim=-1)
        if k < v:
            rest = torch.logsumexp(logp.scatter(-1, ind, float("-inf")), dim=-1)
        else:
            rest = torch.full(logp.shape[:-1], float("-inf"))
        return cls(top, ind, rest, v, float(temperature))


def _bucketise(student_rows: Tensor, topk: TopK, temperature: float) -> tuple[Tensor, Tensor]:
    """Student and teacher as ``k (+1 tail)`` buckets, returned as logits ``x`` with ``log_softmax(x/T)`` = bucket log-probs."""
    if float(temperature) != float(topk.temperature):
        raise AttarError(
            f"the top-k teacher cache was built at temperature {topk.temperature:g} but the loss uses {temperature:g}; "
            "a top-k cache is exact only at its own temperature: rebuild it with temperature equal to the loss's."
        )
    if student_rows.shape[-1] != topk.vocab_size:
        raise AttarError(f"the top-k cache covers a vocabulary of {topk.vocab_size} tokens but the student predicts "
                         f"{student_rows.shape[-1]}; was it built for another vocabulary?")
    log_q = torch.log_softmax(student_rows.float() / temperature, dim=-1)
    ind = topk.index.long().to(log_q.device)
    q_top = log_q.gather(-1, ind)
    t_top = topk.values.float().to(log_q.device).clamp_min(_LOG_FLOOR)
    if topk.k < topk.vocab_size:
        q_rest = torch.logsumexp(log_q.scatter(-1, ind, float("-inf")), dim=-1, keepdim=True)
        t_rest = topk.rest.float().to(log_q.device).clamp_min(_LOG_FLOOR).unsqueeze(-1)
        q_b, t_b = torch.cat([q_top, q_rest], -1), torch.cat([t_top, t_rest], -1)
    else:
        q_b, t_b = q_top, t_top
    return temperature * q_b, temperature * t_b


def token_kd_loss(student_logits: Tensor, teacher: Tensor | TopK, mask: Tensor, divergence_name: str = "kl",
                  temperature: float = 1.0, reduction: str = "mean", **params: Any) -> Tensor:
    """Token-level KD: ``divergence_name`` between teacher and student next-token distributions at the
    scored positions (``mask[:, 1:]``), averaged over those tokens (``reduction="none"``: one value per
    scored token, in row-major order).

    ``student_logits``: ``[B, L, V]``. ``teacher``: ``[B, L, V]`` logits (a live teacher on the same
    ids) or a :class:`TopK` with leading dims ``[B, L]`` (from :class:`LMTeacherCache`), then the
    divergence runs on the k + 1 buckets (module doc). With no scored token the loss is exactly 0
    (kept on the graph)."""
    if student_logits.dim() != 3:
        raise AttarError(f"token_kd_loss: student logits must be [batch, length, vocab], got {tuple(student_logits.shape)}.")
    pos = scored_positions(mask).to(student_logits.device)
    if pos.shape != student_logits.shape[:2] and pos.shape[1] + 1 != student_logits.shape[1]:
        raise AttarError(f"token_kd_loss: mask {tuple(mask.shape)} does not fit logits {tuple(student_logits.shape)}.")
    s = student_logits[:, :-1][pos]
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0 if reduction == "mean" else student_logits.new_zeros(0)
    if isinstance(teacher, TopK):
        sub = TopK(teacher.values[:, :-1], teacher.index[:, :-1], teacher.rest[:, :-1], teacher.vocab_size,
                   teacher.temperature).select(pos.to(teacher.values.device))
        s, t = _bucketise(s, sub, temperature)
    else:
        if teacher.shape != student_logits.shape:
            raise AttarError(f"token_kd_loss: teacher logits {tuple(teacher.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ in shape; check_vocab() first.")
        t = teacher[:, :-1][pos.to(teacher.device)].to(s.device)
    if is_batchwise(divergence_name):
        if reduction != "mean":
            raise AttarError(f"divergence {divergence_name!r} compares all scored tokens as one set; use reduction='mean'.")
        return divergence(divergence_name, s, t, temperature, "mean", **params)
    return divergence(divergence_name, s, t, temperature, reduction, **params)


def token_ce_loss(logits: Tensor, ids: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy (negative log-likelihood) on the response tokens; mean over them."""
    pos = scored_positions(mask).to(logits.device)
    s = logits[:, :-1][pos]
    s = s if s.dtype == torch.float64 else s.float()
    y = ids[:, 1:].to(logits.device)[pos]
    if s.shape[0] == 0:
        return logits.sum() * 0.0 if reduction == "mean" else logits.new_zeros(0)
    return torch.nn.functional.cross_entropy(s, y, reduction=reduction)


# ----------------------------------------------------------------------------------------------
# Vocabulary check and mapping
# ----------------------------------------------------------------------------------------------


@dataclass
class VocabMap:
    """How teacher ids relate to the student's: identity (``index is None``) over ``vocab`` tokens, or
    ``index[s] = t`` (student id → teacher id, ``-1`` = no teacher token)."""

    student_size: int
    teacher_size: int
    index: Tensor | None = None
    cross: str | None = None  # uld/gold: cross-tokenizer KD (attar.distill.lm_cross_tokenizer), no id mapping at all
    note: str = ""  # what the check decided, in words

    @property
    def identity(self) -> bool:
        return self.index is None

    def teacher_ids(self, ids: Tensor) -> Tensor:
        """Student token ids -> the teacher's ids for the same tokens (refuses unmapped tokens)."""
        if self.index is None:
            return ids
        idx = self.index.to(ids.device)
        out = idx[ids.clamp(0, self.student_size - 1)]
        bad = out < 0
        if bool(bad.any()):
            missing = sorted(set(ids[bad].tolist()))[:8]
            raise AttarError(f"the text holds student token ids {missing} that token_map does not map to any teacher "
                             "token; the teacher cannot read them. Extend the map or drop those rows.")
        return out

    def to_student(self, teacher_logits: Tensor) -> Tensor:
        """Teacher logits over its vocabulary -> logits over the student's (unmapped tokens: ``-inf``)."""
        if self.index is None:
            return teacher_logits[..., : self.student_size]
        idx = self.index.to(teacher_logits.device)
        out = teacher_logits[..., idx.clamp_min(0)]
        return out.masked_fill(idx < 0, float("-inf"))


def _vocab_of(tok: Any) -> dict[str, int] | None:
    if tok is None:
        return None
    if isinstance(tok, Mapping):
        return dict(tok)
    return dict(tok.get_vocab())


def _size_of(model_or_size: Any) -> int | None:
    if model_or_size is None:
        return None
    if isinstance(model_or_size, int):
        return model_or_size
    emb = getattr(model_or_size, "get_output_embeddings", lambda: None)()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    cfg = getattr(model_or_size, "config", None)
    return int(cfg.vocab_size) if cfg is not None and getattr(cfg, "vocab_size", None) else None


def _shared_count(a: Any, b: Any) -> int | None:
    """How many token strings the two tokenizers share (None when their vocabularies cannot be read)."""
    from attar.distill.lm_cross_tokenizer import shared_ids

    try:
        return int(shared_ids(a, b)[0].numel())
    except Exception:  # noqa: BLE001 - the count only decorates a message
        return None


def check_vocab(teacher: Any = None, student: Any = None, teacher_tokenizer: Any = None, student_tokenizer: Any = None,
                token_map: Tensor | Mapping[int, int] | None = None, cross_tokenizer: str | None = None) -> VocabMap:
    """Refuse a teacher/student vocabulary mismatch before training, unless ``token_map`` is given.

    ``teacher``/``student`` are HF causal LMs (their output-embedding rows are the logits' size) or
    plain sizes; the tokenizers (or ``{token: id}`` dicts) give the token → id maps. Without a map,
    the logits sizes must agree and the two tokenizers must map every token to the same id (a model
    whose logits are padded past its tokenizer is fine: both are cut to the tokenizer's size).
    ``token_map`` (a ``{student_id: teacher_id}`` dict or a ``LongTensor [V_student]`` with ``-1`` for
    unmapped) must be injective and point inside the teacher's vocabulary.

    ``cross_tokenizer`` (``train.cross_tokenizer`` of the LM route): ``auto`` turns different tokenizers into
    cross-tokenizer KD (``gold``), ``uld``/``gold`` ask for it outright, ``off`` or None (a caller with no
    cross-tokenizer route) refuse different tokenizers; the result's ``cross`` and ``note`` say what applies."""
    vt, vs = _size_of(teacher), _size_of(student)
    tv, sv = _vocab_of(teacher_tokenizer), _vocab_of(student_tokenizer)
    if token_map is not None and cross_tokenizer in ("uld", "gold"):
        raise AttarError(f"token_map maps student ids onto the teacher's for ordinary token KD, but cross_tokenizer is "
                         f"{cross_tokenizer!r}; drop one of them.")
    differ = tv is not None and sv is not None and tv != sv
    if token_map is None and (cross_tokenizer in ("uld", "gold") or (differ and cross_tokenizer == "auto")):
        return _cross_map(cross_tokenizer, teacher_tokenizer, student_tokenizer, tv, sv, vt, vs)
    if token_map is not None:
        if vs is None or vt is None:
            raise AttarError("check_vocab: a token_map needs both models (or their vocabulary sizes).")
        if isinstance(token_map, Mapping):
            idx = torch.full((vs,), -1, dtype=torch.long)
            for s_id, t_id in token_map.items():
                if not 0 <= int(s_id) < vs:
                    raise AttarError(f"token_map: student id {s_id} is outside the student's vocabulary of {vs} tokens.")
                idx[int(s_id)] = int(t_id)
        else:
            idx = torch.as_tensor(token_map, dtype=torch.long).flatten()
            if idx.numel() != vs:
                raise AttarError(f"token_map has {idx.numel()} entries but the student's vocabulary has {vs} tokens; "
                                 "it must give a teacher id (or -1) for every student id.")
        mapped = idx[idx >= 0]
        if bool((idx < -1).any()) or (mapped.numel() and int(mapped.max()) >= vt):
            raise AttarError(f"token_map points outside the teacher's vocabulary of {vt} tokens (ids must be in [0, {vt}) or -1).")
        if mapped.numel() == 0:
            raise AttarError("token_map maps no student token to a teacher token.")
        if mapped.unique().numel() != mapped.numel():
            raise AttarError("token_map maps several student tokens to one teacher token; it must be one-to-one.")
        return VocabMap(vs, vt, idx)
    asked = " (train.cross_tokenizer: off asks for it)" if cross_tokenizer == "off" else ""
    hint = (f"Token-level KD{asked} compares next-token distributions id by id, so teacher and student must share one "
            "tokenizer. For different tokenizers set train.cross_tokenizer: gold (exact on the shared token strings, "
            "ULD on the rest) or uld (sorted probabilities, no mapping) in an lm stage or distill_lm (both tokenizers "
            "needed), pass token_map={student_id: teacher_id, ...}, or use sequence-level KD (teacher generations "
            "decoded to text and re-tokenised for the student).")
    if differ:
        diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])
        shown = ", ".join(f"{k!r}" for k, _ in diff[:5])
        n_shared = _shared_count(student_tokenizer, teacher_tokenizer)
        shared = f"; {n_shared:,} token strings are shared" if n_shared is not None else ""
        raise AttarError(
            f"tokenizer/vocabulary mismatch: the teacher's tokenizer has {len(tv)} tokens (model vocabulary {vt}), the "
            f"student's has {len(sv)} (model vocabulary {vs}); they disagree on tokens such as {shown}{shared}. {hint}")
    n = len(tv) if tv is not None else (len(sv) if sv is not None else None)
    if n is not None:
        for who, v in (("teacher", vt), ("student", vs)):
            if v is not None and v < n:
                raise AttarError(f"tokenizer/vocabulary mismatch: the {who} model predicts {v} tokens but its tokenizer "
                                 f"has {n}. {hint}")
        return VocabMap(n, n)
    if vt is not None and vs is not None and vt != vs:
        raise AttarError(f"tokenizer/vocabulary mismatch: the teacher predicts {vt} tokens, the student {vs}. {hint}")
    size = vs if vs is not None else vt
    if size is None:
        raise AttarError("check_vocab: give the models (or their vocabulary sizes) or the tokenizers.")
    return VocabMap(size, size)


def _cross_map(mode: str, teacher_tokenizer: Any, student_tokenizer: Any, tv: dict | None, sv: dict | None,
               vt: int | None, vs: int | None) -> VocabMap:
    """The :class:`VocabMap` of cross-tokenizer KD: each side's scored vocabulary (its tokenizer's size, the model's
    padded rows cut) and the mode (``auto`` -> gold), with the shared token strings in ``note``."""
    if tv is None or sv is None or not hasattr(teacher_tokenizer, "get_vocab") or isinstance(teacher_tokenizer, Mapping) \
            or isinstance(student_tokenizer, Mapping):
        raise AttarError(f"cross_tokenizer {mode!r}: cross-tokenizer KD re-tokenises the student's text for the "
                         "teacher, so it needs both tokenizers (Hugging Face tokenizers, not id tables); pass "
                         "teacher_tokenizer and student_tokenizer.")
    chosen = "gold" if mode == "auto" else mode
    sizes = []
    for who, tok, model in (("teacher", tv, vt), ("student", sv, vs)):
        n = max(tok.values()) + 1 if tok else 0
        if model is not None and model < n:
            raise AttarError(f"tokenizer/vocabulary mismatch: the {who} model predicts {model} tokens but its "
                             f"tokenizer has {n}.")
        sizes.append(n)
    n_shared = _shared_count(student_tokenizer, teacher_tokenizer)
    same = tv == sv
    why = "one tokenizer, cross-tokenizer loss asked for" if same else "the tokenizers differ"
    shared = f", {n_shared:,} token strings shared" if n_shared is not None else ""
    note = (f"{why}: cross-tokenizer KD ({chosen}) between the teacher's {sizes[0]:,}-token and the student's "
            f"{sizes[1]:,}-token vocabulary{shared}")
    return VocabMap(sizes[1], sizes[0], cross=chosen, note=note)


# ----------------------------------------------------------------------------------------------
# Running models
# ----------------------------------------------------------------------------------------------


def _device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def lm_logits(model: nn.Module, ids: Tensor, pad_id: int | None = None) -> Tensor:
    """``model(input_ids, attention_mask).logits`` (float32) for right-padded ids."""
    attn = (ids != pad_id).long() if pad_id is not None else None
    out = model(input_ids=ids.to(_device(model)), attention_mask=None if attn is None else attn.to(_device(model)))
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def teacher_lm_logits(teacher: nn.Module, ids: Tensor, vmap: VocabMap, pad_id: int | None = None,
                      teacher_pad_id: int | None = None) -> Tensor:
    """The teacher's logits on the student's ids, over the student's vocabulary (see :class:`VocabMap`)."""
    t_ids = vmap.teacher_ids(ids) if not vmap.identity else ids
    if not vmap.identity and pad_id is not None:
        # padding is never scored; give the teacher its own pad id there
        t_ids = torch.where(ids == pad_id, torch.as_tensor(teacher_pad_id if teacher_pad_id is not None else 0), t_ids)
    attn_src = ids if pad_id is not None else None
    attn = (attn_src != pad_id).long() if attn_src is not None else None
    out = teacher(input_ids=t_ids.to(_device(teacher)), attention_mask=None if attn is None else attn.to(_device(teacher)))
    return vmap.to_student((out.logits if hasattr(out, "logits") else out).float()).to(ids.device)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def ids_hash(ids: Any) -> str:
    """What a cache records of the rows it was built on: the hash of an ids tensor (or of an ``LMSplit``'s ids), or
    a token store split's own fingerprint (its shards' sha256 and rows: nothing is read for it)."""
    if isinstance(ids, Tensor):
        return tensor_hash(ids)
    if isinstance(ids, LMSplit):
        return tensor_hash(ids.ids)
    return ids.fingerprint()


class LMTeacherCache:
    """Teacher top-k next-token log-probs for every position of every training row (module doc).

    ``values`` float16 ``[N, L, k]``, ``index`` int16/int32 ``[N, L, k]``, ``rest`` float32 ``[N, L]``;
    ``get(rows)`` returns a :class:`TopK` for those rows. Built once with :meth:`build`; records the
    teacher's and the ids' hashes so a stale cache is refused (:meth:`load`)."""

    def __init__(self, values: Tensor, index: Tensor, rest: Tensor, vocab_size: int, temperature: float,
                 teacher_hash: str = "", data_hash: str = ""):
        self.values, self.index, self.rest = values, index, rest
        self.vocab_size, self.temperature = int(vocab_size), float(temperature)
        self.teacher_hash, self.data_hash = teacher_hash, data_hash

    @property
    def k(self) -> int:
        return int(self.index.shape[-1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.index, self.rest))

    @property
    def mode(self) -> str:
        full = self.values.shape[0] * self.values.shape[1] * self.vocab_size * 4
        return (f"cached top-{self.k} of {self.vocab_size} per token + tail bucket, T={self.temperature:g} "
                f"({self.bytes / 2**20:.1f} MiB vs {full / 2**20:.1f} MiB as fp32 logits)")

    def get(self, rows: Tensor, width: int | None = None) -> TopK:
        rows = torch.as_tensor(rows, dtype=torch.long)
        w = width or self.values.shape[1]
        return TopK(self.values[rows, :w].float(), self.index[rows, :w].long(), self.rest[rows, :w], self.vocab_size,
                    self.temperature)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, ids: Any, k: int, temperature: float = 1.0, batch_size: int = 64,
              vmap: VocabMap | None = None, pad_id: int | None = None, teacher_pad_id: int | None = None) -> "LMTeacherCache":
        """``ids``: the training rows' token ids ``[N, L]``, or the split itself (an ``LMSplit`` or a token store's
        ``PackedBlocks``: read ``batch_size`` rows at a time)."""
        if len(ids) == 0:
            raise AttarError("LMTeacherCache.build: no rows.")
        if not (math.isfinite(temperature) and temperature > 0):
            raise AttarError(f"LMTeacherCache.build: temperature must be positive, got {temperature!r}.")
        was = teacher.training
        teacher.eval()
        vm = vmap or check_vocab(teacher, teacher)
        vals, inds, rests = [], [], []
        try:
            for i in range(0, len(ids), batch_size):
                x = ids[i : i + batch_size] if isinstance(ids, Tensor) else ids.slice(i, i + batch_size).ids
                z = teacher_lm_logits(teacher, x, vm, pad_id, teacher_pad_id)
                tk = TopK.from_logits(z, k, temperature)
                vals.append(tk.values.clamp_min(_LOG_FLOOR).half())
                ind_dtype = torch.int16 if tk.vocab_size <= 32767 else torch.int32
                inds.append(tk.index.to(ind_dtype))
                rests.append(tk.rest.clamp_min(_LOG_FLOOR).float())
                vsize = tk.vocab_size
        finally:
            teacher.train(was)
        return cls(torch.cat(vals), torch.cat(inds), torch.cat(rests), vsize, temperature, model_hash(teacher),
                   ids_hash(ids))

    def mismatch(self, teacher: nn.Module | None = None, ids: Any = None, k: int | None = None,
                 temperature: float | None = None) -> str | None:
        if teacher is not None and model_hash(teacher) != self.teacher_hash:
            return "the teacher's weights differ"
        if ids is not None and ids_hash(ids) != self.data_hash:
            return "the token ids differ from those the cache was built on"
        if k is not None and k != self.k:
            return f"the cache keeps k={self.k}, {k} requested"
        if temperature is not None and float(temperature) != self.temperature:
            return f"the cache was built at temperature {self.temperature:g}, {temperature:g} requested"
        return None

    def save(self, path: str | Path) -> str:
        meta = {"format": CACHE_FORMAT, "vocab_size": str(self.vocab_size), "temperature": repr(self.temperature),
                "teacher": self.teacher_hash, "data": self.data_hash}
        return atomic_save_safetensors({"values": self.values, "index": self.index, "rest": self.rest}, path, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "LMTeacherCache":
        from safetensors import safe_open

        t = load_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise AttarError(f"{path} is not an attar LM teacher cache (format {meta.get('format')!r}).")
        return cls(t["values"], t["index"], t["rest"], int(meta["vocab_size"]), float(meta["temperature"]),
                   meta.get("teacher", ""), meta.get("data", ""))

    @classmethod
    def load_or_build(cls, path: str | Path, teacher: nn.Module, ids: Any, k: int, temperature: float = 1.0,
                      **kw: Any) -> tuple["LMTeacherCache", bool]:
        path = Path(path)
        if path.exists():
            try:
                c = cls.load(path)
                if c.mismatch(teacher, ids, k, temperature) is None:
                    return c, False
            except AttarError:
                pass
        c = cls.build(teacher, ids, k, temperature, **kw)
        c.save(path)
        return c, True
