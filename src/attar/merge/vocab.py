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

A tokenizer may list tokens past its model's vocabulary rows (padding ids, ``<UNUSED_0>``...): they have no row,
so, as in mergekit, each merged model's vocabulary is cut at its row count before aligning (the output never
lists them, and its tokenizer files drop them when the lead model had them).

``tokenizer.tokens`` (mergekit's per-token sources) sets an output token's row: ``{source: MODEL}`` (that model's
row for the token), ``{source: {kind: model_token, model: MODEL, token_id: N}}`` (row N of that model, or
``token: T``: the row of its own token T) or ``{source: {kind: zero}}``. Without ``force`` the source only fills
the inputs that lack the token; with ``force: true`` it replaces every input's row, so a weighted merge of the
equal rows gives that row (mergekit's semantics). Keys are tokens as the output tokenizer's vocabulary spells
them; a key, model or source token that does not exist is refused with its field named (mergekit ignores an
unknown key).

The output carries the output vocabulary's tokenizer (``tokenizer.json`` with the tokens added,
``tokenizer_config.json`` with their ``added_tokens_decoder`` entries; slow-tokenizer files that no longer
agree are left out). ``chat_template`` (a Jinja string, ``chatml``, or ``auto``: the template most inputs
share) is written into the output's ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from attar.errors import AttarError
from attar.text.vocab_align import TokenizerVocab, VocabAlignment, align_vocabularies, read_vocab, spell

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}

_VOCAB_RE = re.compile(
    r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in|embed_out|tok_embeddings|lm_head|shared|output|decoder)\.weight$"
)
_IN_BLOCK = re.compile(r"\.\d+\.")  # a numbered block (layers.3., h.0., ...): embeddings and heads live outside


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor's first axis is the vocabulary (input embeddings, output heads).

    Why the block check: generic names such as ``output`` and ``decoder`` also name layers inside transformer blocks
    (``layers.0.mlp.output.weight``); taking one of those for the vocabulary would cut the tokenizer to its rows."""
    return bool(_VOCAB_RE.search(name)) and not _IN_BLOCK.search(name)


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
    overrides: list["TokenOverride"] = field(default_factory=list)
    cut: list[int] = field(default_factory=list)

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
            out.append(torch.where(p.view(shape), g, row))
        for ov in self.overrides:  # tokenizer.tokens: forced rows everywhere, the others where an input lacks the token
            value = self._override_row(ov, tensors)
            for aligned, p in zip(out, present):
                if ov.force or not bool(p[ov.out]):
                    aligned[ov.out] = value
        if self.rows > self.tokens:
            out = [torch.cat([a, a.mean(0, keepdim=True).expand(self.rows - self.tokens, *a.shape[1:])]) for a in out]
        return out

    def _override_row(self, ov: "TokenOverride", tensors: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        t0 = tensors[0][1]
        if ov.model is None:
            return torch.zeros(t0.shape[1:])
        found = [t for k, t in tensors if k == ov.model]
        if not found:
            raise AttarError(f"{ov.field}: {self.labels[ov.model]} is not an input of this vocabulary tensor, so it cannot "
                             f"give token {ov.token!r} its row; take the row from a model that is merged.")
        t = found[0]
        if not 0 <= ov.row < t.shape[0]:
            raise AttarError(f"{ov.field}: row {ov.row} is out of range for {self.labels[ov.model]} "
                             f"({t.shape[0]} vocabulary rows).")
        return t[ov.row].float()

    def describe(self) -> str:
        al = self.alignment
        parts = [f"{self.labels[k]} lacks {al.missing(k)}" for k in range(self.inputs) if al.missing(k)]
        parts += [f"{self.labels[k]}'s {al.dropped(k)} extra dropped" for k in range(self.inputs) if al.dropped(k)]
        moved = [self.labels[k] for k in range(self.inputs) if not al.is_identity(k) and not al.missing(k)]
        parts += [f"{', '.join(moved)} re-ordered"] if moved else []
        pad = f", padded to {self.rows} rows" if self.rows > self.tokens else ""
        cut = [f"{self.labels[k]}'s {c} tokens past its rows dropped" for k, c in enumerate(self.cut) if c]
        set_by = [f"{ov.token!r} {'forced' if ov.force else 'filled'} from {ov.what}" for ov in self.overrides]
        return (f"vocabulary aligned by token string ({self.mode}): {self.tokens} tokens{pad}"
                + (f"; {'; '.join(parts)}" if parts else "; every input already had it")
                + (f"; {'; '.join(cut)}" if cut else "")
                + (f"; tokenizer.tokens: {', '.join(set_by)}" if set_by else ""))

    def tokenizer_files(self) -> dict[str, bytes | None]:
        """The output's tokenizer files (None: leave out a file copied from the reference model)."""
        root = self.roots[self.lead]
        files: dict[str, bytes | None] = {n: None for n in SLOW_TOKENIZER_FILES + _TOKENIZER_COPY}
        lead_files = {n: (root / n).read_bytes() for n in _TOKENIZER_COPY if root is not None and (root / n).is_file()}
        files.update(lead_files)
        al = self.alignment
        appended = range(len(al.vocabs[self.lead]), len(al))
        lead_cut = self.cut[self.lead] if self.lead < len(self.cut) else 0
        if lead_cut:
            lead_files = _strip_past(lead_files, len(al.vocabs[self.lead]))
            files.update(lead_files)
            if not appended:
                return files
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


def _strip_past(files: dict[str, bytes], keep: int) -> dict[str, bytes]:
    """The lead's tokenizer files without the tokens whose id is ``keep`` or more (ids past the model's rows):
    from the model vocabulary, the added tokens, the BPE merges that use them, ``added_tokens_decoder`` and the
    special-token lists."""
    files = dict(files)
    data = json.loads(files["tokenizer.json"])
    model = data.get("model") or {}
    vocab = model.get("vocab")
    gone: set[str] = {t["content"] for t in data.get("added_tokens") or [] if t["id"] >= keep}
    if isinstance(vocab, dict):
        gone |= {t for t, i in vocab.items() if i >= keep}
        model["vocab"] = {t: i for t, i in vocab.items() if i < keep}
    elif isinstance(vocab, list):
        gone |= {entry[0] for entry in vocab[keep:]}
        model["vocab"] = vocab[:keep]
    if isinstance(model.get("merges"), list):
        model["merges"] = [m for m in model["merges"]
                           if not set(m.split(" ") if isinstance(m, str) else m) & gone]
    data["added_tokens"] = [t for t in data.get("added_tokens") or [] if t["id"] < keep]
    files["tokenizer.json"] = json.dumps(data, ensure_ascii=False, indent=2).encode()
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        if fname not in files:
            continue
        cfg = json.loads(files[fname])
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            cfg["added_tokens_decoder"] = {i: v for i, v in cfg["added_tokens_decoder"].items() if int(i) < keep}
        for key in _SPECIAL_LISTS:
            if isinstance(cfg.get(key), list):
                cfg[key] = [e for e in cfg[key] if (e if isinstance(e, str) else e.get("content")) not in gone]
        files[fname] = json.dumps(cfg, ensure_ascii=False, indent=2).encode()
    return files


def vocab_rows(src) -> int | None:
    """The fewest rows among a tensor source's vocabulary tensors (None if it has none): ids at or past it have no
    row in that model."""
    rows = [src.shape(n)[0] for n in src.names() if is_vocab_tensor(n) and src.dtype(n).is_floating_point]
    return min(rows) if rows else None


def _cut(v: TokenizerVocab, rows: int | None) -> tuple[TokenizerVocab, int]:
    """``v`` without the ids at or past ``rows`` (and how many listed tokens that removed)."""
    if rows is None or len(v) <= rows:
        return v, 0
    gone = sum(1 for t in v.tokens[rows:] if t is not None)
    keep = frozenset(range(rows))
    return TokenizerVocab(tokens=v.tokens[:rows], keys=v.keys[:rows], family=v.family, added=v.added & keep,
                          special=v.special & keep), gone


@dataclass
class TokenOverride:
    """One resolved ``tokenizer.tokens`` entry: output id ``out`` takes row ``row`` of input ``model`` (None:
    zeros), in every input (``force``) or only in those lacking the token."""

    token: str
    out: int
    model: int | None
    row: int | None
    force: bool
    field: str
    what: str


def _resolve_tokens(tokens: Mapping[str, Any], al: VocabAlignment, labels: Sequence[str], roots: Sequence[Path | None],
                    n: int, rows: Sequence[int | None], base_dir: Path | None, mode: str) -> list[TokenOverride]:
    """``tokenizer.tokens`` as rows of the merged inputs, every name checked (keys, models, source tokens)."""
    out_ids: dict[str, int] = {}
    for j, t in enumerate(al.tokens):
        if t is not None:
            out_ids.setdefault(t, j)
    merged = ", ".join(labels[:n])

    def model_index(name: str, where: str) -> int:
        k = labels.index(name) if name in labels[:n] else _same_folder(_resolve_folder(name, base_dir), roots[:n])
        if k is None:
            raise AttarError(f"{where}: {name!r} is not one of the merged models ({merged}).")
        return k

    result = []
    for token, cfg in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if token not in out_ids:
            raise AttarError(f"{where}: the output vocabulary ({mode}) has no token {token!r}; keys are tokens as the "
                             "output tokenizer's vocabulary spells them (e.g. 'Ġthe' in a byte-level BPE).")
        j = out_ids[token]
        src = cfg.source
        if isinstance(src, str):
            k = model_index(src, f"{where}.source")
            row = int(al.sources[k][j])
            if row < 0:
                raise AttarError(f"{where}.source: {labels[k]} has no token {token!r} (or no row for it); take another "
                                 f"model's row, or a row by id: {{kind: model_token, model: {labels[k]}, token_id: N}}.")
            result.append(TokenOverride(token, j, k, row, cfg.force, f"{where}.source", labels[k]))
        elif getattr(src, "kind", None) == "model_token":
            k = model_index(src.model, f"{where}.source.model")
            if src.token_id is not None:
                row, fld = src.token_id, f"{where}.source.token_id"
                if rows[k] is not None and row >= rows[k]:
                    raise AttarError(f"{fld}: {row} is out of range for {labels[k]} ({rows[k]} vocabulary rows).")
            else:
                fld = f"{where}.source.token"
                own = al.vocabs[k].tokens
                if src.token not in own:
                    raise AttarError(f"{fld}: {labels[k]}'s tokenizer has no token {src.token!r} (within its "
                                     f"{len(own)} rows).")
                row = own.index(src.token)
            result.append(TokenOverride(token, j, k, row, cfg.force, fld, f"{labels[k]} row {row}"))
        else:  # {kind: zero}
            result.append(TokenOverride(token, j, None, None, cfg.force, f"{where}.source", "zeros"))
    return result


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
               pad: int | None = None, base_dir: Path | None = None, tokens: Mapping[str, Any] | None = None,
               rows: Sequence[int | None] | None = None) -> VocabPlan | None:
    """The output vocabulary for ``tokenizer_source``/``tokenizer.source`` ``source`` over the inputs (``base``:
    the index of the base model among them), None when no input has a tokenizer (and no padding is asked).
    ``rows``: each input's vocabulary rows (its tokens past them are dropped); ``tokens``: ``tokenizer.tokens``."""
    labels, roots = list(labels), list(roots)
    missing = [label for label, r in zip(labels, roots) if r is None or not (Path(r) / "tokenizer.json").is_file()]
    if len(missing) == len(labels) and not pad and not tokens:
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
    in_rows = list(rows) + [None] * (len(roots) - len(rows)) if rows is not None else [None] * len(roots)
    cut = [_cut(read_vocab(roots[k]), in_rows[k]) for k in order]
    vocabs = [v for v, _ in cut]
    dropped = [cut[order.index(k)][1] for k in range(len(roots))]
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
    overrides = _resolve_tokens(tokens, al, labels, roots, n, in_rows, base_dir, mode) if tokens else []
    size = len(al)
    return VocabPlan(alignment=al, labels=labels, tokens=size, rows=padded(size, pad), base=base, lead=lead,
                     inputs=n, mode=mode, roots=roots, overrides=overrides, cut=dropped)


def _sample(keys: set[bytes]) -> str:
    return ", ".join(sorted(k.decode("utf-8", errors="replace") for k in keys)[:3])
