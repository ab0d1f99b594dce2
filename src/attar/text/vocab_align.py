"""Token-string alignment of tokenizers: which ids of two vocabularies spell the same text.

Different tokenizer families spell the same text differently: GPT-2 style byte-level BPE writes a leading space
as ``Ġ`` and a newline as ``Ċ`` (every byte mapped to a printable character), SentencePiece writes a space as
``▁`` and bytes it has no piece for as ``<0x0A>``-style byte-fallback tokens. Comparing raw strings would miss
most equal tokens across families, so each token is first *normalised to the bytes it decodes to*; two tokens
match when their bytes are equal. Added tokens (``<|im_start|>``, a fine-tune's new specials) are taken as
written (their content is never byte-encoded).

Used by cross-tokenizer distillation (exact matches where vocabularies share strings) and by merging models
whose vocabularies differ (embedding and output-head rows aligned by token string).

Inputs may be a ``transformers`` tokenizer, a ``tokenizers.Tokenizer``, a folder (or ``tokenizer.json`` file)
of a Hugging Face tokenizer, or a plain ``{token: id}`` mapping (family guessed from its markers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from attar.errors import AttarError

__all__ = [
    "TokenizerVocab",
    "VocabAlignment",
    "align_vocabularies",
    "read_vocab",
    "shared_token_ids",
    "spell",
]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (printable Latin-1 maps to itself, the rest to U+0100...)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_UNICODE = _bytes_to_unicode()
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


@dataclass
class TokenizerVocab:
    """One tokenizer's vocabulary as attar aligns it.

    ``tokens[i]`` is id i's raw string (None for an id the tokenizer leaves unused), ``keys[i]`` the bytes it
    decodes to, ``family`` how raw strings were decoded (``byte_level``, ``metaspace`` or ``plain``), ``added``
    the ids of added tokens and ``special`` those marked special.
    """

    tokens: list[str | None]
    keys: list[bytes | None]
    family: str
    added: frozenset[int] = frozenset()
    special: frozenset[int] = frozenset()
    _canon: dict[bytes, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def canonical(self) -> dict[bytes, int]:
        """normalised bytes -> the one id that stands for them (a regular piece before a byte-fallback token
        spelling the same byte, then the lowest id)."""
        if self._canon is None:
            canon: dict[bytes, int] = {}
            fallback = []
            for i, (raw, key) in enumerate(zip(self.tokens, self.keys)):
                if key is None:
                    continue
                if self.family != "byte_level" and i not in self.added and _BYTE_FALLBACK.match(raw or ""):
                    fallback.append((i, key))
                    continue
                canon.setdefault(key, i)
            for i, key in fallback:
                canon.setdefault(key, i)
            self._canon = canon
        return self._canon

    def special_keys(self) -> set[bytes]:
        return {self.keys[i] for i in self.special if self.keys[i] is not None}


def _walk_types(node: Any) -> list[tuple[str, Any]]:
    """Every (type, node) in a tokenizer.json component tree (Sequences nested)."""
    out: list[tuple[str, Any]] = []
    if isinstance(node, dict):
        if "type" in node:
            out.append((node["type"], node))
        for value in node.values():
            if isinstance(value, (dict, list)):
                out.extend(_walk_types(value))
    elif isinstance(node, list):
        for value in node:
            out.extend(_walk_types(value))
    return out


def _family_from_json(data: Mapping[str, Any]) -> str | None:
    kinds = {t for part in ("decoder", "pre_tokenizer") for t, _ in _walk_types(data.get(part))}
    if "ByteLevel" in kinds:
        return "byte_level"
    if "Metaspace" in kinds:
        return "metaspace"
    for kind, node in _walk_types([data.get("decoder"), data.get("normalizer")]):
        if kind == "Replace" and "▁" in json.dumps(node, ensure_ascii=False):
            return "metaspace"
    return None


def _guess_family(tokens: Sequence[str | None]) -> str:
    """Byte-level BPE spells spaces 'Ġ', SentencePiece '▁'; whichever marks more tokens wins (plain if neither)."""
    g = sum(1 for t in tokens if t and t.startswith("Ġ"))
    s = sum(1 for t in tokens if t and t.startswith("▁"))
    if max(g, s) == 0:
        return "plain"
    return "byte_level" if g >= s else "metaspace"


def _key(raw: str, family: str, added: bool) -> bytes:
    if added:
        return raw.encode("utf-8")
    if family == "byte_level":
        if all(c in _UNICODE_TO_BYTE for c in raw):
            return bytes(_UNICODE_TO_BYTE[c] for c in raw)
        return raw.encode("utf-8")
    m = _BYTE_FALLBACK.match(raw)
    if m:
        return bytes([int(m.group(1), 16)])
    if family == "metaspace":
        raw = raw.replace("▁", " ")
    return raw.encode("utf-8")


def spell(key: bytes, family: str) -> str | None:
    """The raw vocabulary string that decodes to ``key`` in a tokenizer of ``family`` (the inverse of the
    normalisation), or None when that family cannot write it (bytes that are not UTF-8 outside byte-level BPE,
    except one byte, which SentencePiece writes as a byte-fallback token)."""
    if family == "byte_level":
        return "".join(_BYTE_TO_UNICODE[b] for b in key)
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return f"<0x{key[0]:02X}>" if len(key) == 1 and family == "metaspace" else None
    return text.replace(" ", "▁") if family == "metaspace" else text


def _from_json(data: Mapping[str, Any]) -> TokenizerVocab:
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        pairs = {entry[0]: i for i, entry in enumerate(vocab)}
    elif isinstance(vocab, dict):
        pairs = dict(vocab)
    else:
        raise AttarError("tokenizer.json has no model vocabulary (model.vocab); attar aligns BPE, WordPiece, "
                         "WordLevel and Unigram tokenizers.")
    added_list = data.get("added_tokens") or []
    for tok in added_list:
        pairs[tok["content"]] = tok["id"]
    added = frozenset(t["id"] for t in added_list)
    special = frozenset(t["id"] for t in added_list if t.get("special"))
    tokens = _dense(pairs)
    family = _family_from_json(data) or _guess_family(tokens)
    return _build(tokens, family, added, special)


def _dense(pairs: Mapping[str, int]) -> list[str | None]:
    size = max(pairs.values()) + 1 if pairs else 0
    tokens: list[str | None] = [None] * size
    for tok, i in pairs.items():
        if i < 0:
            raise AttarError(f"token {tok!r} has a negative id {i}.")
        tokens[i] = tok
    return tokens


def _build(tokens: list[str | None], family: str, added: frozenset[int], special: frozenset[int]) -> TokenizerVocab:
    keys = [None if t is None else _key(t, family, i in added) for i, t in enumerate(tokens)]
    return TokenizerVocab(tokens=tokens, keys=keys, family=family, added=added, special=special)


def read_vocab(tok: Any) -> TokenizerVocab:
    """A :class:`TokenizerVocab` from a tokenizer, a folder / ``tokenizer.json`` path or a ``{token: id}`` mapping."""
    if isinstance(tok, TokenizerVocab):
        return tok
    if isinstance(tok, (str, Path)):
        path = Path(tok)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise AttarError(f"no tokenizer.json at {path}; vocabulary alignment reads a Hugging Face fast tokenizer.")
        return _from_json(json.loads(path.read_text()))
    if isinstance(tok, Mapping):
        tokens = _dense(tok)
        return _build(tokens, _guess_family(tokens), frozenset(), frozenset())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # transformers fast tokenizer
        return _from_json(json.loads(backend.to_str()))
    if hasattr(tok, "to_str") and hasattr(tok, "get_vocab"):  # tokenizers.Tokenizer
        return _from_json(json.loads(tok.to_str()))
    if hasattr(tok, "get_vocab"):  # slow tokenizer: no component description, so the family is guessed
        pairs = dict(tok.get_vocab())
        tokens = _dense(pairs)
        decoder = getattr(tok, "added_tokens_decoder", {}) or {}
        added = frozenset(int(i) for i in decoder)
        special = frozenset(int(i) for i, t in decoder.items() if getattr(t, "special", False))
        return _build(tokens, _guess_family(tokens), added, special)
    raise AttarError(f"cannot read a vocabulary from {type(tok).__name__}; pass a Hugging Face tokenizer, a "
                     "tokenizer folder / tokenizer.json path, or a {token: id} mapping.")


def shared_token_ids(tok_a: Any, tok_b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of ``tok_a`` and ``tok_b`` whose tokens decode to the same bytes, as two aligned LongTensors
    (sorted by ``tok_a``'s id; one pair per distinct string, using each side's canonical id)."""
    a, b = read_vocab(tok_a), read_vocab(tok_b)
    cb = b.canonical
    pairs = sorted((ia, cb[key]) for key, ia in a.canonical.items() if key in cb)
    if not pairs:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    ids = torch.tensor(pairs, dtype=torch.long)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()


@dataclass
class VocabAlignment:
    """Several vocabularies aligned to one output vocabulary by token string.

    ``tokens``/``keys``: the output vocabulary's raw strings and normalised bytes (output id = list index; the
    lead input's ids -- ``base``, or input 0 for the union -- are kept as they are, unused ids as None).
    ``maps[k]``: LongTensor over input k's ids -> output id, -1 where input k's token is not in the output
    (only possible with a base vocabulary) or the id is unused. ``sources[k]``: LongTensor over output ids ->
    input k's id for that token, -1 where input k lacks it (the rows a merge must initialise). ``origin[j]``:
    the input whose raw string output token j takes; ``base`` the input whose vocabulary is the output (None
    for the union: input 0's vocabulary, then each later input's tokens it lacks, by id).
    """

    tokens: list[str | None]
    keys: list[bytes | None]
    maps: list[torch.Tensor]
    sources: list[torch.Tensor]
    origin: list[int]
    vocabs: list[TokenizerVocab]
    base: int | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def missing(self, k: int) -> int:
        """How many output tokens input k lacks."""
        return int((self.sources[k] < 0).sum())

    def dropped(self, k: int) -> int:
        """How many of input k's tokens have no place in the output (base vocabulary only)."""
        keys = self.vocabs[k].keys
        return sum(1 for i, m in enumerate(self.maps[k].tolist()) if m < 0 and keys[i] is not None)

    def is_identity(self, k: int) -> bool:
        """Whether input k's ids already are the output ids (nothing to move)."""
        src = self.sources[k]
        return len(self.vocabs[k]) == len(src) and bool((src == torch.arange(len(src))).all())


def align_vocabularies(tokenizers: Sequence[Any], base: int | None = None) -> VocabAlignment:
    """Align ``tokenizers`` to one vocabulary by normalised token string: their union (``base=None``: input 0's
    tokens in id order, then each later input's tokens it lacks) or input ``base``'s own vocabulary."""
    vocabs = [read_vocab(t) for t in tokenizers]
    if not vocabs:
        raise AttarError("align_vocabularies needs at least one tokenizer.")
    if base is not None and not 0 <= base < len(vocabs):
        raise AttarError(f"base={base} is not an input index (0..{len(vocabs) - 1}).")
    lead = 0 if base is None else base
    lv = vocabs[lead]
    # the lead vocabulary keeps its ids exactly (unused ids and duplicate spellings included), so the lead
    # model's rows never move; later tokens are appended after it
    tokens: list[str | None] = list(lv.tokens)
    keys: list[bytes | None] = list(lv.keys)
    origin: list[int] = [lead] * len(tokens)
    out_id: dict[bytes, int] = dict(lv.canonical)
    if base is None:
        for k, v in enumerate(vocabs):
            if k == lead:
                continue
            for i in sorted(v.canonical.values()):
                key = v.keys[i]
                if key not in out_id:
                    out_id[key] = len(tokens)
                    tokens.append(v.tokens[i])
                    keys.append(key)
                    origin.append(k)
    maps, sources = [], []
    for k, v in enumerate(vocabs):
        if k == lead:
            m = torch.arange(len(v), dtype=torch.long)
            s = torch.cat([m, torch.full((len(tokens) - len(v),), -1, dtype=torch.long)])
        else:
            m = torch.tensor([out_id.get(key, -1) if key is not None else -1 for key in v.keys], dtype=torch.long)
            canon = v.canonical
            s = torch.tensor([canon.get(key, -1) if key is not None else -1 for key in keys], dtype=torch.long)
        maps.append(m)
        sources.append(s)
    return VocabAlignment(tokens=tokens, keys=keys, maps=maps, sources=sources, origin=origin, vocabs=vocabs, base=base)
