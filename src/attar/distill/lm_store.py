"""A causal-LM teacher run once over a corpus's training rows into a stored-output folder
(:mod:`attar.data.teacher_store`), and read back as KD targets in place of the live teacher.

* :func:`dump_lm_teacher`: the teacher's top-k log-probs, ids and tail mass at every scored position of every
  training row, ``shard_rows`` rows per shard; resumable (finished shards are kept and skipped), progress with ETA.
* :class:`StoredLMTeacher`: the store where :class:`~attar.distill.lm_objectives.LMTeacherCache` plugs in
  (``get(rows, width) -> TopK``, ``mismatch``, ``len``), so ``distill_lm(cache=...)`` and the ``lm`` stage's
  ``teacher: {store: PATH}`` read it. :meth:`StoredLMTeacher.check` refuses a store made with another tokenizer or
  vocabulary, temperature or data rows, naming the mismatch.
* :func:`reconstruction_kl`: fidelity, measured: KL(teacher's full distribution ‖ the stored one), where the stored
  distribution is the top-k as stored and the tail mass spread uniformly over the ``V − k`` other ids.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from attar.data.teacher_store import DEFAULT_STEP, StoreSettings, StoreWriter, TeacherStore
from attar.distill.lm_objectives import _LOG_FLOOR, TopK, _size_of
from attar.distill.lm_task import head_split, scored
from attar.distill.teacher_cache import model_hash, tensor_hash
from attar.errors import AttarError
from attar.text.lm_split import LMSplit

__all__ = ["rows_hash", "dump_lm_teacher", "StoredLMTeacher", "reconstruction_kl", "topk_of"]

DEFAULT_K = 32
DEFAULT_SHARD_ROWS = 128


def rows_hash(split: Any) -> str:
    """What a store records of the rows it was made on: the ids and response mask of an ``LMSplit`` (the positions
    that are scored), or a token store split's own fingerprint (nothing is read for it)."""
    if isinstance(split, LMSplit):
        return tensor_hash(split.ids, split.mask.bool())
    return split.fingerprint()


def topk_of(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(top log-probs [n, k] descending, ids [n, k], log tail mass [n])`` of ``log_softmax(logits / T)``."""
    tk = TopK.from_logits(logits, k, temperature)
    return tk.values, tk.index, tk.rest


# ---------------------------------------------------------------------------------------------- dumping


def _through_last_scored(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The columns up to the last response token of any row. Not ``trim_padding``: a scored token whose id equals the
    pad id (an EOS that doubles as padding) would be cut there, and a training batch that keeps that column (because
    another row is longer) would then ask the store for a position it never kept."""
    cols = mask.any(0).nonzero()
    w = int(cols.max()) + 1 if len(cols) else 1
    return ids[:, :w], mask[:, :w]



@torch.no_grad()
def dump_lm_teacher(teacher: nn.Module, split: Any, out: str | Path, *, pad_id: int, k: int = DEFAULT_K,
                    temperature: float = 1.0, step: float = DEFAULT_STEP, vocab_size: int | None = None,
                    teacher_name: str = "", tokenizer: str = "", data: str = "", shard_rows: int = DEFAULT_SHARD_ROWS,
                    batch_size: int = 8, zstd_level: int = 9, overwrite: bool = False, progress: bool | None = None,
                    on_shard: Callable[[int], None] | None = None) -> TeacherStore:
    """Run ``teacher`` over every row of ``split`` (an ``LMSplit`` or a token store's blocks) and write its top-``k``
    at each scored position into ``out`` (module doc of :mod:`attar.data.teacher_store`).

    ``vocab_size``: cut logits padded past the tokenizer to this many. ``tokenizer``: the tokenizer's fingerprint
    (:func:`attar.text.token_store.tokenizer_fingerprint`), ``data``: a description of the rows; both recorded.
    A folder holding a dump with the same settings is resumed (its finished shards are kept); one with other
    settings is refused (``overwrite`` replaces it). ``on_shard(i)`` is called after shard ``i`` is written."""
    from attar.train.progress import StepProgress

    n = len(split)
    if n == 0:
        raise AttarError("teacher dump: the split has no rows.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise AttarError(f"teacher dump: temperature must be positive, got {temperature!r}.")
    if not 0 < step <= 1:
        raise AttarError(f"teacher dump: step (the log-prob quantisation step, nats) must be in (0, 1], got {step}.")
    head = head_split(teacher)
    v = int(vocab_size or _size_of(teacher) or 0)
    if v <= 0:
        raise AttarError("teacher dump: give vocab_size (the teacher's logits width could not be read).")
    if not 1 <= k <= v:
        raise AttarError(f"teacher dump: k must be in [1, {v}] (the vocabulary size), got {k}.")
    settings = StoreSettings(kind="lm", teacher=teacher_name, teacher_hash=model_hash(teacher), tokenizer=tokenizer,
                             vocab_size=v, k=k, temperature=float(temperature), step=float(step), data=data,
                             data_hash=rows_hash(split), rows=n, width=int(split.width), shard_rows=int(shard_rows),
                             zstd_level=zstd_level)
    writer = StoreWriter(out, settings, overwrite=overwrite)
    was = teacher.training
    teacher.eval()
    todo = [i for i in range(writer.n_shards) if i not in writer.done]
    done_rows = n - sum(b - a for a, b in map(writer.shard_rows, todo))
    try:
        with StepProgress("teacher dump", n, done_rows, progress, unit="rows") as bar:
            for i in todo:
                a, b = writer.shard_rows(i)
                masks, tops, inds, rests = [], [], [], []
                for c in range(a, b, batch_size):
                    part = split.slice(c, min(c + batch_size, b))
                    pos_full = scored(part.mask)
                    masks.append(torch.cat([pos_full, torch.zeros(len(pos_full), 1, dtype=torch.bool)], 1))
                    ids, mask = _through_last_scored(part.ids, part.mask)
                    pos = scored(mask)
                    if bool(pos.any()):
                        dev = next(teacher.parameters()).device
                        rows, fn = head.at(ids.to(dev), (ids != pad_id).long().to(dev), pos.to(dev))
                        for r in range(0, len(rows), 512):
                            top, ind, rest = topk_of(fn(rows[r : r + 512])[:, :v], k, temperature)
                            tops.append(top.cpu())
                            inds.append(ind.cpu())
                            rests.append(rest.cpu())
                    bar.update(len(part))
                cat = (lambda xs, shape: torch.cat(xs).numpy() if xs else np.zeros(shape, np.float32))
                writer.write(i, torch.cat(masks).numpy(), cat(tops, (0, k)), cat(inds, (0, k)).astype(np.int64),
                             cat(rests, (0,)))
                if on_shard is not None:
                    on_shard(i)
    finally:
        teacher.train(was)
    writer.finish()
    return TeacherStore.open(out, verify=False)


# ---------------------------------------------------------------------------------------------- reading


class StoredLMTeacher:
    """A :class:`TeacherStore` of an LM teacher where a top-k cache plugs in (``get(rows, width) -> TopK``)."""

    rebuild_hint = "Dump the teacher again on these rows (attar teacher dump) with the stage's data and temperature."

    def __init__(self, store: TeacherStore | str | Path):
        self.store = store if isinstance(store, TeacherStore) else TeacherStore.open(store)
        st = self.store.settings
        if st.kind != "lm":
            raise AttarError(f"teacher store {self.store.folder} holds a {st.kind}'s outputs, not a language model's.")
        self.vocab_size, self.temperature, self.k = st.vocab_size, st.temperature, st.k

    def __len__(self) -> int:
        return len(self.store)

    @property
    def bytes(self) -> int:
        return self.store.bytes

    @property
    def mode(self) -> str:
        st = self.store.settings
        return (f"stored top-{st.k} of {st.vocab_size} per token + tail bucket, T={st.temperature:g}, step "
                f"{st.step:g} ({self.bytes / 2**20:.1f} MiB, {self.store.bytes_per_position:.1f} B/token; "
                f"{self.store.folder})")

    def get(self, rows: Tensor, width: int | None = None) -> TopK:
        values, ids, rest, _ = self.store.dense(torch.as_tensor(rows).reshape(-1).numpy(), width)
        return TopK(torch.from_numpy(values), torch.from_numpy(ids).long(),
                    torch.from_numpy(rest).clamp_min(_LOG_FLOOR), self.vocab_size, self.temperature)

    def mismatch(self, teacher: nn.Module | None = None, ids: Any = None, k: int | None = None,
                 temperature: float | None = None) -> str | None:
        st = self.store.settings
        if teacher is not None and model_hash(teacher) != st.teacher_hash:
            return f"it was made with other teacher weights ({st.teacher or 'unnamed'}, hash {st.teacher_hash})"
        if ids is not None:
            if len(ids) != st.rows:
                return f"it was made on {st.rows} rows ({st.data}), the training split has {len(ids)}"
            h = rows_hash(ids)
            if h != st.data_hash:
                return (f"it was made on other data rows ({st.data}; data hash {st.data_hash}, these rows hash to {h}): "
                        "the same text, max_len, prompt_len, limits and seed give the same rows")
        if k is not None and k != st.k:
            return f"it keeps k={st.k}, {k} requested"
        if temperature is not None and float(temperature) != st.temperature:
            return (f"it was made at temperature {st.temperature:g}, the loss uses {float(temperature):g} (stored "
                    "top-k log-probs are exact only at their own temperature)")
        return None

    def check(self, *, tokenizer: str | None = None, vocab_size: int | None = None, ids: Any = None,
              temperature: float | None = None) -> None:
        """Refuse the store when it was made for another tokenizer/vocabulary, temperature or rows (named)."""
        st = self.store.settings
        where = f"teacher store {self.store.folder}"
        if vocab_size is not None and vocab_size != st.vocab_size:
            raise AttarError(f"{where} covers a vocabulary of {st.vocab_size} tokens, the student's has {vocab_size}: it "
                             f"was made with another tokenizer ({st.teacher or 'its teacher'}'s). {self.rebuild_hint}")
        if tokenizer and st.tokenizer and tokenizer != st.tokenizer:
            raise AttarError(f"{where} was made with another tokenizer (fingerprint {st.tokenizer[:12]}, the student's "
                             f"is {tokenizer[:12]}; both {st.vocab_size} tokens): token ids would not mean the same "
                             f"tokens. {self.rebuild_hint}")
        why = self.mismatch(ids=ids, temperature=temperature)
        if why:
            raise AttarError(f"{where} does not fit: {why}. {self.rebuild_hint}")


# ---------------------------------------------------------------------------------------------- fidelity


def reconstruction_kl(logits: Tensor, topk: TopK) -> Tensor:
    """Per position KL(p ‖ p̂) in nats: ``p`` = ``softmax(logits / T)`` over the whole vocabulary, ``p̂`` = the stored
    top-k log-probs at their ids and the stored tail mass spread uniformly over the other ``V − k`` ids."""
    logp = torch.log_softmax(logits.float() / topk.temperature, -1)
    v, k = logp.shape[-1], topk.k
    if v != topk.vocab_size:
        raise AttarError(f"reconstruction_kl: logits over {v} tokens, the top-k over {topk.vocab_size}.")
    ind = topk.index.long().to(logp.device)
    if k < v:
        each = topk.rest.float().to(logp.device) - math.log(v - k)
        logq = each.unsqueeze(-1).expand_as(logp).clone()
    else:
        logq = torch.full_like(logp, float("-inf"))
    logq.scatter_(-1, ind, topk.values.float().to(logp.device))
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq.clamp_min(-1e30)), torch.zeros_like(p))
    return terms.sum(-1)
