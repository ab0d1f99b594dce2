"""The output vocabulary of a merge: mergekit's ``tokenizer`` settings and ``chat_template``, for one shared vocabulary.

attar does not build or align tokenizers: when a config asks for a tokenizer (``tokenizer_source`` or a
``tokenizer:`` block), every input must have the same vocabulary (``tokenizer.json``'s vocabulary and added
tokens), and the output's is that one. As mergekit does then, each input's vocabulary tensors (embeddings,
output head) keep the tokenizer's rows (rows past it, e.g. an earlier padding, are dropped) and, with
``pad_to_multiple_of: N``, get new rows up to the next multiple of N, each the mean of the input's own
tokenizer rows; then the method merges them like any row. ``chat_template`` (a Jinja string, ``chatml``, or
``auto``: the template most inputs share) is written into the output's ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from attar.errors import AttarError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}

_VOCAB_RE = re.compile(
    r"(embed_tokens|word_embeddings|wte|embed_in|embed_out|tok_embeddings|lm_head|shared|output|decoder)\.weight$"
)


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor's first axis is the vocabulary (input embeddings, output heads)."""
    return bool(_VOCAB_RE.search(name))


def tokenizer_vocab(root: Path | None) -> dict[str, int] | None:
    """token -> id of a Hugging Face folder's ``tokenizer.json`` (model vocabulary plus added tokens), or None."""
    if root is None or not (Path(root) / "tokenizer.json").is_file():
        return None
    data = json.loads((Path(root) / "tokenizer.json").read_text())
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out = {entry[0]: i for i, entry in enumerate(vocab)}
    elif isinstance(vocab, dict):
        out = dict(vocab)
    else:
        return None
    for tok in data.get("added_tokens") or []:
        out.setdefault(tok["content"], tok["id"])
    return out


def shared_vocab_size(labels: Sequence[str], roots: Sequence[Path | None], source: str, pad: int | None = None) -> int | None:
    """The one vocabulary size all inputs share, None when no input has a tokenizer (nothing to build: the
    setting is moot unless ``pad`` asks for padding), or an error naming what attar cannot do."""
    vocabs = [tokenizer_vocab(r) for r in roots]
    missing = [label for label, v in zip(labels, vocabs) if v is None]
    if len(missing) == len(labels) and not pad:
        return None
    if missing:
        raise AttarError(f"tokenizer source {source!r} needs every input's tokenizer.json; none in {', '.join(missing)}. "
                         "Drop `tokenizer_source`/`tokenizer` to keep the reference model's tokenizer files.")
    first = vocabs[0]
    for label, v in zip(labels[1:], vocabs[1:]):
        if v != first:
            raise AttarError(
                f"tokenizer source {source!r}: {label} has a different vocabulary from {labels[0]} "
                f"({len(v)} vs {len(first)} tokens). Merging tokenizers (aligning different vocabularies) is not "
                "supported by attar; merge models that share one vocabulary."
            )
    return len(first)


def padded(size: int, multiple: int | None) -> int:
    if multiple and size % multiple:
        return size + multiple - size % multiple
    return size


def resize_vocab(tensor: torch.Tensor, keep: int, rows: int) -> torch.Tensor:
    """The first ``keep`` rows, then ``rows − keep`` new rows, each the mean of those kept (float32)."""
    t = tensor[:keep].float()
    if rows == keep:
        return t
    return torch.cat([t, t.mean(dim=0, keepdim=True).expand(rows - keep, *t.shape[1:])], dim=0)


def _template_of(root: Path | None) -> str | None:
    if root is None:
        return None
    jinja = Path(root) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = Path(root) / "tokenizer_config.json"
    if cfg.is_file():
        t = json.loads(cfg.read_text()).get("chat_template")
        if isinstance(t, dict):
            t = t.get("default")
        return t if isinstance(t, str) and t else None
    return None


def resolve_chat_template(value: str, roots: Sequence[Path | None]) -> str | None:
    """A Jinja template from a config's ``chat_template``: ``auto``, a built-in name or the template itself."""
    if value == "auto":
        found = [t.strip() for t in (_template_of(r) for r in roots) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise AttarError(f"chat_template {value!r} is neither a Jinja template nor a built-in name attar knows "
                         f"({', '.join(sorted(NAMED_TEMPLATES))}, or auto); paste the template itself.")
    return value


def tokenizer_files_with_template(root: Path, template: str) -> dict[str, bytes]:
    """The output's ``tokenizer_config.json`` (and ``chat_template.jinja`` when the reference has one) carrying ``template``."""
    cfg = json.loads((root / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    files = {"tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False).encode()}
    if (root / "chat_template.jinja").is_file():
        files["chat_template.jinja"] = template.encode()
    if (root / "chat_template.json").is_file():
        files["chat_template.json"] = json.dumps({"chat_template": template}).encode()
    return files
