"""The output vocabulary of a merge: mergekit's ``tokenizer`` settings and ``chat_template``.

With ``tokenizer_source`` (or ``tokenizer: {source: ...}``) the inputs' vocabularies are aligned by token
string (:mod:`attar.text.vocab_align`: tokens match when they decode to the same bytes, so a re-ordered
vocabulary or a fine-tune's added tokens line up) to one output vocabulary: ``union`` (the base model's --
or the first model's -- tokens in their ids, then every other input's tokens it lacks), ``base`` (that
model's own vocabulary; others' extra tokens are dropped) or a model (``model:PATH`` or the path itself: an
input, or any folder with a ``tokenizer.json``). Every vocabulary tensor (embeddings, output head) of every
input is then re-indexed to the output ids before the method merges it like any row.

Rows a model lacks are filled as mergekit 0.1.5 fills them, so a token only one model knows keeps that
model's row under every method (a fine-tune's added tokens keep their fine-tuned rows): from the base
model's row when the base has the token, else the mean of the rows of the inputs that have it; a token no
input has (only possible with an outside tokenizer) gets the model's mean row (mergekit: zeros).
``pad_to_multiple_of: N`` adds rows up to the next multiple of N, each the mean of the model's aligned rows.
Tied embeddings stay tied: the one tensor is aligned once, and equal tensors are aligned equally.

The output carries the output vocabulary's tokenizer (``tokenizer.json`` with the tokens added,
``tokenizer_config.json`` with their ``added_tokens_decoder`` entries; slow-tokenizer files that no longer
agree are left out). ``chat_template`` (a Jinja string, ``chatml``, or ``auto``: the template most inputs
share) is written into the output's ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from attar.errors import AttarError
from attar.text.vocab_align import VocabAlignment, align_vocabularies, read_vocab, spell

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


def tokenizer_files_with_template(root: Path, template: str, config: bytes | None = None) -> dict[str, bytes]:
    """The output's ``tokenizer_config.json`` (``config``, else the reference's; and ``chat_template.jinja``
    when the reference has one) carrying ``template``."""
    cfg = json.loads(config if config is not None else (root / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    files = {"tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False).encode()}
    if (root / "chat_template.jinja").is_file():
        files["chat_template.jinja"] = template.encode()
    if (root / "chat_template.json").is_file():
        files["chat_template.json"] = json.dumps({"chat_template": template}).encode()
    return files


SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                        "sentencepiece.bpe.model", "added_tokens.json")
_TOKENIZER_COPY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class VocabPlan:
    """How every input's vocabulary tensors become the output's: the alignment, the output row count, the
    input whose tokenizer files the output's start from, and what the alignment did (for the notes)."""

    alignment: VocabAlignment
    labels: list[str]
    tokens: int
    rows: int
    base: int | None
    lead: int
    inputs: int
    mode: str
    roots: list[Path | None]

    def align(self, tensors: Sequence[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Re-index one vocabulary tensor of several inputs (``(input index, tensor)``) to the output rows, in
        float32, filling the rows each lacks (see the module docstring) and adding the padding rows."""
        gathered, present = [], []
        for k, t in tensors:
            src = self.alignment.sources[k]
            ok = (src >= 0) & (src < t.shape[0])
            gathered.append(t.float()[src.clamp(min=0).where(ok, torch.zeros_like(src))])
            present.append(ok)
        shape = (-1,) + (1,) * (gathered[0].dim() - 1)
        count = torch.stack(present).sum(0)
        total = sum(g * p.view(shape) for g, p in zip(gathered, present))
        fill = total / count.clamp(min=1).view(shape)
        base_at = [i for i, (k, _) in enumerate(tensors) if k == self.base]
        if base_at:
            i = base_at[0]
            fill = torch.where(present[i].view(shape), gathered[i], fill)
        out = []
        for g, p in zip(gathered, present):
            own_mean = g[p].mean(0) if bool(p.any()) else torch.zeros(g.shape[1:])
            row = torch.where((count > 0).view(shape), fill, own_mean.unsqueeze(0))
            aligned = torch.where(p.view(shape), g, row)
            if self.rows > self.tokens:
                aligned = torch.cat([aligned, aligned.mean(0, keepdim=True).expand(self.rows - self.tokens, *aligned.shape[1:])])
            out.append(aligned)
        return out

    def describe(self) -> str:
        al = self.alignment
        parts = [f"{self.labels[k]} lacks {al.missing(k)}" for k in range(self.inputs) if al.missing(k)]
        parts += [f"{self.labels[k]}'s {al.dropped(k)} extra dropped" for k in range(self.inputs) if al.dropped(k)]
        moved = [self.labels[k] for k in range(self.inputs) if not al.is_identity(k) and not al.missing(k)]
        parts += [f"{', '.join(moved)} re-ordered"] if moved else []
        pad = f", padded to {self.rows} rows" if self.rows > self.tokens else ""
        return (f"vocabulary aligned by token string ({self.mode}): {self.tokens} tokens{pad}"
                + (f"; {'; '.join(parts)}" if parts else "; every input already had it"))

    def tokenizer_files(self) -> dict[str, bytes | None]:
        """The output's tokenizer files (None: leave out a file copied from the reference model)."""
        root = self.roots[self.lead]
        files: dict[str, bytes | None] = {n: None for n in SLOW_TOKENIZER_FILES + _TOKENIZER_COPY}
        lead_files = {n: (root / n).read_bytes() for n in _TOKENIZER_COPY if root is not None and (root / n).is_file()}
        files.update(lead_files)
        al = self.alignment
        appended = range(len(al.vocabs[self.lead]), len(al))
        if not appended:
            for n in SLOW_TOKENIZER_FILES:  # the lead's own tokenizer: its slow files still agree
                if root is not None and (root / n).is_file():
                    files[n] = (root / n).read_bytes()
            return files
        data = json.loads(lead_files["tokenizer.json"])
        cfg = json.loads(lead_files.get("tokenizer_config.json", b"{}"))
        family = al.vocabs[self.lead].family
        vocab = (data.get("model") or {}).get("vocab")
        added = data.setdefault("added_tokens", [])
        decoder = cfg.setdefault("added_tokens_decoder", {}) if "tokenizer_config.json" in lead_files else {}
        entries: dict[int, dict[int, dict]] = {}
        for j in appended:
            k = al.origin[j]
            origin = al.vocabs[k]
            i = int(al.sources[k][j])
            raw = spell(al.keys[j], family) if i not in origin.added else None
            if raw is not None and isinstance(vocab, dict) and raw not in vocab:
                vocab[raw] = j
                continue
            entry = {"id": j, "content": al.keys[j].decode("utf-8", errors="replace"), "single_word": False,
                     "lstrip": False, "rstrip": False, "normalized": i not in origin.special, "special": i in origin.special}
            if k not in entries:
                entries[k] = _added_entries(self.roots[k])
            entry.update({key: v for key, v in entries[k].get(i, {}).items() if key != "id"})
            added.append(entry)
            decoder[str(j)] = {key: v for key, v in entry.items() if key != "id"}
        files["tokenizer.json"] = json.dumps(data, ensure_ascii=False, indent=2).encode()
        if "tokenizer_config.json" in lead_files:
            files["tokenizer_config.json"] = json.dumps(cfg, ensure_ascii=False, indent=2).encode()
        new_specials = [al.keys[j].decode("utf-8", errors="replace") for j in appended
                        if int(al.sources[al.origin[j]][j]) in al.vocabs[al.origin[j]].special]
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            if files.get(fname) is not None:
                files[fname] = _list_specials(files[fname], new_specials, [self.roots[k] for k in sorted(set(al.origin))])
        return files


_SPECIAL_LISTS = ("extra_special_tokens", "additional_special_tokens")


def _list_specials(raw: bytes, new: list[str], roots: Sequence[Path | None]) -> bytes:
    """Add the special tokens another input brought to the lists transformers builds ``all_special_tokens`` from
    (``extra_special_tokens`` in transformers 5, ``additional_special_tokens`` before), under the key the
    input that brought them used (its tokenizer_config.json or special_tokens_map.json)."""
    cfg = json.loads(raw)
    listed: dict[str, str] = {}
    for root in roots:
        for fname in ("tokenizer_config.json", "special_tokens_map.json"):
            f = None if root is None else root / fname
            other = json.loads(f.read_text()) if f is not None and f.is_file() else {}
            for key in _SPECIAL_LISTS:
                entries = other.get(key)
                for entry in entries if isinstance(entries, list) else []:
                    listed.setdefault(entry if isinstance(entry, str) else entry.get("content", ""), key)
    changed = False
    for content in new:
        key = listed.get(content)
        if key is None:
            continue
        have = cfg.setdefault(key, [])
        if content not in [e if isinstance(e, str) else e.get("content") for e in have]:
            have.append(content)
            changed = True
    return json.dumps(cfg, ensure_ascii=False, indent=2).encode() if changed else raw


def _added_entries(root: Path | None) -> dict[int, dict]:
    """id -> the ``added_tokens`` entry of a tokenizer.json (flags: special, lstrip, normalized, ...)."""
    if root is None:
        return {}
    return {tok["id"]: tok for tok in json.loads((root / "tokenizer.json").read_text()).get("added_tokens") or []}


def _resolve_folder(ref: str, base_dir: Path | None) -> Path | None:
    p = Path(ref).expanduser()
    for c in ([base_dir / p] if base_dir and not p.is_absolute() else []) + [p]:
        if (c / "tokenizer.json").is_file():
            return c
    return None


def _same_folder(folder: Path | None, roots: Sequence[Path | None]) -> int | None:
    if folder is None:
        return None
    found = [k for k, r in enumerate(roots) if r is not None and Path(r).resolve() == folder.resolve()]
    return found[0] if found else None


def plan_vocab(labels: Sequence[str], roots: Sequence[Path | None], source: str, *, base: int | None,
               pad: int | None = None, base_dir: Path | None = None) -> VocabPlan | None:
    """The output vocabulary for ``tokenizer_source``/``tokenizer.source`` ``source`` over the inputs (``base``:
    the index of the base model among them), None when no input has a tokenizer (and no padding is asked)."""
    labels, roots = list(labels), list(roots)
    missing = [label for label, r in zip(labels, roots) if r is None or not (Path(r) / "tokenizer.json").is_file()]
    if len(missing) == len(labels) and not pad:
        return None
    if missing:
        raise AttarError(f"tokenizer source {source!r} needs every input's tokenizer.json; none in {', '.join(missing)}. "
                         "Drop `tokenizer_source`/`tokenizer` to keep the reference model's tokenizer files.")
    n = len(labels)
    lead = base if base is not None else 0
    name = source.removeprefix("model:")
    if source == "union":
        mode = f"union, {labels[lead]}'s ids first"
        out_base = None
    elif source == "base":
        mode = f"{labels[lead]}'s vocabulary"
        out_base = lead
    elif name in labels or _same_folder(_resolve_folder(name, base_dir), roots) is not None:
        lead = out_base = labels.index(name) if name in labels else _same_folder(_resolve_folder(name, base_dir), roots)
        mode = f"{labels[lead]}'s vocabulary"
    else:
        folder = _resolve_folder(name, base_dir)
        if folder is None:
            raise AttarError(f"tokenizer source {source!r} is not union, base, one of the merged models "
                             f"({', '.join(labels)}) nor a folder with a tokenizer.json.")
        labels.append(name)
        roots.append(folder)
        lead = out_base = n
        mode = f"{name}'s vocabulary (not a merged model)"
    order = [lead] + [k for k in range(len(roots)) if k != lead]  # the union's lead vocabulary comes first
    vocabs = [read_vocab(roots[k]) for k in order]
    al = align_vocabularies(vocabs, base=0 if out_base is not None else None)
    back = {pos: k for pos, k in enumerate(order)}
    # put maps/sources back in the inputs' order
    idx = [order.index(k) for k in range(len(roots))]
    al.maps = [al.maps[i] for i in idx]
    al.sources = [al.sources[i] for i in idx]
    al.vocabs = [al.vocabs[i] for i in idx]
    al.origin = [back[o] for o in al.origin]
    al.base = lead if out_base is not None else None
    lead_v = al.vocabs[lead]
    for k in range(n):
        if k == lead:
            continue
        a, b = lead_v.special_keys(), al.vocabs[k].special_keys()
        if a and b and not a & b:
            shared = sum(1 for key in al.vocabs[k].canonical if key in lead_v.canonical)
            raise AttarError(
                f"tokenizers share no special tokens: {labels[k]} has {_sample(b)}, {labels[lead]} has {_sample(a)}. "
                f"The alignment used ({mode}; token strings normalised to bytes: 'Ġ'/'▁' spaces, '<0x..>' bytes) "
                f"matches {shared} of {labels[k]}'s {len(al.vocabs[k].canonical)} tokens, but no BOS/EOS/chat token; "
                "these are models of different families, whose merged weights would mean nothing. Merge fine-tunes "
                "of one base model.")
    tokens = len(al)
    return VocabPlan(alignment=al, labels=labels, tokens=tokens, rows=padded(tokens, pad), base=base, lead=lead,
                     inputs=n, mode=mode, roots=roots)


def _sample(keys: set[bytes]) -> str:
    return ", ".join(sorted(k.decode("utf-8", errors="replace") for k in keys)[:3])
