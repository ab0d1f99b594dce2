"""Sampling from a causal LM: continuations of prompts (on-policy rows, teacher generations, monitors).

Kept apart from the training code so the LM task (which samples on-policy rows) and the entry points in
:mod:`attar.distill.lm` (which sample teacher generations) share one sampler without importing each other.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attar.text.charlm import LMSplit
from attar.train.objective import device_of

__all__ = ["sample_continuations", "trim_padding"]


def trim_padding(ids: Tensor, mask: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Cut trailing columns that are padding in every row."""
    keep = (ids != pad_id).any(0)
    w = int(keep.nonzero().max()) + 1 if bool(keep.any()) else 1
    return ids[:, :w], mask[:, :w]


@torch.no_grad()
def sample_continuations(model: nn.Module, split: LMSplit, pad_id: int, eos_id: int | None, temperature: float = 1.0,
                         generator: torch.Generator | None = None, length: int | None = None,
                         vocab_size: int | None = None) -> LMSplit:
    """Keep each row's prompt and sample its response from ``model`` (KV cache, ancestral sampling).

    Rows are grouped by prompt length; each gets ``length`` new tokens (default: the split's width minus
    the prompt, so rows keep their shape). Tokens after the first EOS become padding; the response
    mask covers the sampled tokens up to and including that EOS. ``vocab_size`` cuts padded logits."""
    was = model.training
    model.eval()
    dev = device_of(model)
    width = split.ids.shape[1]
    ids = torch.full_like(split.ids, pad_id)
    mask = torch.zeros_like(split.mask)
    if length is not None:
        width = int(split.prompt_len.max()) + length
        ids = torch.full((len(split), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(split), width), dtype=torch.bool)
    try:
        for p in sorted(set(split.prompt_len.tolist())):
            rows = (split.prompt_len == p).nonzero().flatten()
            n_new = width - p
            cur = split.ids[rows, :p].to(dev)
            ids[rows, :p] = cur.cpu()
            if n_new <= 0:
                continue
            out = model(input_ids=cur, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            done = torch.zeros(len(rows), dtype=torch.bool)
            for j in range(n_new):
                z = logits.float()[:, :vocab_size] if vocab_size else logits.float()
                probs = torch.softmax(z / temperature, dim=-1).cpu()
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                live = ~done
                ids[rows[live], p + j] = tok[live]
                mask[rows[live], p + j] = True
                if eos_id is not None:
                    done |= tok == eos_id
                if bool(done.all()) or j == n_new - 1:
                    break
                out = model(input_ids=tok.unsqueeze(1).to(dev), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
    finally:
        model.train(was)
    return LMSplit(ids, mask, split.prompt_len.clone())
