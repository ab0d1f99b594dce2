"""Language-model rows in memory: :class:`LMSplit` (token ids, response mask, prompt lengths) and :class:`LMData`
(train/val/test with the pad and EOS ids).

A split is read through ``len(split)``, ``split.width``, ``split.rows(idx)`` and ``split.slice(a, b)`` (both return
an in-memory ``LMSplit``), ``split.response_tokens`` and ``split.prompt_len``. A memory-mapped token store's
:class:`attar.text.token_store.PackedBlocks` answers the same calls without loading its corpus, so code written
against these calls (training rows, perplexity, the teacher cache, agreement) works on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attar.errors import AttarError


@dataclass
class LMSplit:
    """Right-padded token ids ``[N, L]``, the response mask ``[N, L]`` and each row's prompt length."""

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: torch.Tensor
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        """Tokens per row (the padded length)."""
        return int(self.ids.shape[1])

    def rows(self, idx: torch.Tensor) -> "LMSplit":
        idx = torch.as_tensor(idx, dtype=torch.long)
        texts = [self.texts[i] for i in idx.tolist()] if self.texts else []
        return LMSplit(self.ids[idx], self.mask[idx], self.prompt_len[idx], texts)

    def slice(self, start: int, stop: int) -> "LMSplit":
        """Rows ``start:stop`` (views, no copy)."""
        return LMSplit(self.ids[start:stop], self.mask[start:stop], self.prompt_len[start:stop],
                       self.texts[start:stop] if self.texts else [])

    @property
    def response_tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class LMData:
    train: Any  # LMSplit, or a token store's PackedBlocks (same calls)
    val: Any
    test: Any
    pad_id: int
    eos_id: int | None
    info: dict[str, Any] = field(default_factory=dict)

    def with_train(self, train: Any) -> "LMData":
        return LMData(train, self.val, self.test, self.pad_id, self.eos_id, dict(self.info))


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """``(bos, eos, pad)`` of a tokenizer; pad falls back to EOS, and one of them must exist."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise AttarError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return bos, eos, int(pad)
