"""Causal language models for distillation: a byte-level tokenizer, tiny GPT-2 models, and LM data.

attar trains its own small teachers (real pretrained ones come from :mod:`attar.text.pretrained_lm`):
a small GPT-2 (``transformers.GPT2LMHeadModel``) over a **byte-level vocabulary** of 258 tokens. The choice:

* **Bytes, not characters.** Token id ``b`` *is* byte ``b`` (0..255) of the UTF-8 text, so any text
  (accents, emoji) is representable with no unknown token and no vocabulary to learn; two special
  tokens follow: ``256 = <|endoftext|>`` (both BOS and EOS) and ``257 = <pad>``.
* **A real Hugging Face tokenizer.** It is a ``PreTrainedTokenizerFast`` (a ``tokenizers`` BPE with
  the 256 GPT-2 byte symbols and *no merges*, ByteLevel pre-tokenizer/decoder), saved next to the
  model with ``save_pretrained``; ``AutoTokenizer`` / ``AutoModelForCausalLM`` load the folder back.
  So attar's own models and "any HF causal LM folder" a user has go through the same code path
  (:func:`load_causal_lm`).

LM data (:func:`lm_data`, :func:`lm_pairs`) is a right-padded ``LongTensor [N, L]`` of token ids with
a boolean **response mask** ``[N, L]``: ``mask[i, t]`` is True when token ``t`` of row ``i`` is a
response token, i.e. a token the losses score (predicted from the tokens before it). Plain text is
turned into prompt/response pairs by a fixed prompt length: the first ``prompt_len`` tokens after BOS
are the prompt, the rest (up to ``max_len``, then EOS) the response. ``prompt_len[i]`` records where
row ``i``'s response starts (the on-policy sampler continues from there).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from attar.checkpoint import apply_umask
from attar.errors import AttarError
from attar.text.hf import _quiet_transformers
from attar.text.lm_split import LMData, LMSplit, special_ids as _special_ids
from attar.text.row_store import RowView, row_store
from attar.text.text_stream import TextStream, text_stream
from attar.text.token_store import SHARD_BYTES, RowStoreSettings, split_of, token_store, tokenizer_fingerprint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BYTE_VOCAB = 258
EOS_ID = 256
PAD_ID = 257
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"
_TEST_SEED = 0  # the test rows are the same for every seed


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer() -> Any:
    """The 258-token byte-level ``PreTrainedTokenizerFast``: id = byte value, 256 = BOS/EOS, 257 = pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _quiet_transformers()
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab[EOS_TOKEN], vocab[PAD_TOKEN] = EOS_ID, PAD_ID
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tok.padding_side = "right"
    return tok


def make_byte_lm(folder: str | Path | None = None, layers: int = 4, d_model: int = 128, heads: int = 4,
                 context: int = 256, seed: int = 0, dropout: float = 0.0, vocab_size: int = BYTE_VOCAB) -> Any:
    """A fresh ``GPT2LMHeadModel`` over the byte vocabulary (tied input/output embeddings).

    With ``folder`` the model and :func:`byte_tokenizer` are written there (``save_pretrained``), so
    ``AutoModelForCausalLM.from_pretrained(folder)`` / :func:`load_causal_lm` read it back.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    if d_model % heads:
        raise AttarError(f"make_byte_lm: d_model={d_model} must be divisible by heads={heads}.")
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=d_model, n_layer=layers, n_head=heads,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=EOS_ID,
                     eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if folder is not None:
        save_causal_lm(model, byte_tokenizer(), folder)
    return model


def save_causal_lm(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """``save_pretrained`` of the model (safetensors) and its tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))

    apply_umask(*folder.glob("*.safetensors"))  # safetensors writes 0600; others sharing the folder could not read it
    return folder


def load_causal_lm(path: str | Path, dtype: Any = None) -> tuple[Any, Any]:
    """``(AutoModelForCausalLM, AutoTokenizer)`` from a local Hugging Face folder; nothing is downloaded.

    ``dtype``: the weights' dtype (default ``torch.float32``, whatever the folder was saved in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise AttarError(f"{p} is not a Hugging Face model folder (no config.json); give a folder written by "
                         "save_pretrained (attar.text.charlm.make_byte_lm(folder) makes one).")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True,
                                                     dtype=torch.float32 if dtype is None else dtype)
    except Exception as e:
        raise AttarError(f"cannot load {p} as a causal LM ({type(e).__name__}: {e}).") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise AttarError(f"cannot load a tokenizer from {p} ({type(e).__name__}: {e}); token-level KD needs the "
                         "tokenizer to check that teacher and student share a vocabulary.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def _ids(out: Any) -> list[int]:
    """Token ids from apply_chat_template, which returns a list or (transformers 5) a BatchEncoding."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _encode(texts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def lm_pairs(prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, max_len: int = 256,
             chat_template: bool = False) -> LMSplit:
    """Prompt/response pairs -> ``[BOS] prompt response [EOS]`` with the mask on response (+EOS) tokens.

    ``chat_template``: the prompt becomes a user turn in the tokenizer's chat template, ending with the
    assistant's header (``add_generation_prompt``), so the model learns to answer as it will be asked at
    inference. Rows longer than ``max_len`` keep their prompt and lose the end of the response; a row whose
    prompt alone fills ``max_len`` is refused (it would have nothing to learn)."""
    if len(prompts) != len(responses):
        raise AttarError(f"lm_pairs: {len(prompts)} prompts but {len(responses)} responses.")
    if not prompts:
        raise AttarError("lm_pairs: no rows.")
    rows, plen = _pair_rows(prompts, responses, tokenizer, max_len, chat_template)
    return _pad_rows(rows, plen, _special_ids(tokenizer)[2])


def _pair_rows(prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, max_len: int, chat_template: bool,
               first: int = 0) -> tuple[list[list[int]], list[int]]:
    """The rows of :func:`lm_pairs` unpadded, and their prompt lengths (``first``: the number of the first row, for
    the error); the in-memory rows and a token store's are both made here."""
    bos, eos, _ = _special_ids(tokenizer)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise AttarError(f"chat_template: the tokenizer ({type(tokenizer).__name__}) has no chat template; use an "
                             "instruction-tuned model's tokenizer, or set chat_template: false to train on plain "
                             "prompt + response text.")
        encoded = [_ids(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                      tokenize=True)) for p in prompts]
        head = []  # the template brings its own start
    else:
        encoded = _encode(prompts, tokenizer)
    rows, plen = [], []
    for i, (p, r) in enumerate(zip(encoded, _encode(responses, tokenizer))):
        p = head + p
        if len(p) >= max_len:
            raise AttarError(f"lm_pairs: row {first + i}'s prompt has {len(p)} tokens, max_len={max_len} leaves no "
                             "room for a response; raise max_len or shorten the prompt.")
        rows.append((p + r + tail)[:max_len])
        plen.append(len(p))
    return rows, plen


def _pad_rows(rows: list[list[int]], plen: list[int], pad: int, texts: list[str] | None = None) -> LMSplit:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, plen)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, p : len(r)] = True
    return LMSplit(ids, mask, torch.tensor(plen, dtype=torch.long), list(texts or []))


def lm_texts(texts: Sequence[str], tokenizer: Any, prompt_len: int = 16, max_len: int = 128,
             min_response: int = 4) -> tuple[LMSplit, int]:
    """Plain texts -> rows ``[BOS] t[:prompt_len] | t[prompt_len:] [EOS]`` cut at ``max_len`` tokens.

    Texts shorter than ``prompt_len + min_response`` tokens are dropped; returns (split, dropped)."""
    made = _text_rows(texts, tokenizer, prompt_len, max_len, min_response)
    kept = [(t, r, p) for t, (r, p) in zip(texts, made) if r is not None]
    if not kept:
        raise AttarError(_no_text_row(prompt_len, min_response))
    return (_pad_rows([r for _, r, _ in kept], [p for _, _, p in kept], _special_ids(tokenizer)[2], [t for t, _, _ in kept]),
            len(texts) - len(kept))


def _no_text_row(prompt_len: int, min_response: int) -> str:
    return f"lm_texts: no text has at least prompt_len + min_response = {prompt_len + min_response} tokens."


def _text_rows(texts: Sequence[str], tokenizer: Any, prompt_len: int, max_len: int,
               min_response: int) -> list[tuple[list[int] | None, int]]:
    """Each text's row of :func:`lm_texts` unpadded and its prompt length, ``(None, 0)`` for a text too short; the
    in-memory rows and a token store's are both made here."""
    if prompt_len < 1 or max_len <= prompt_len + 1:
        raise AttarError(f"lm_texts: need 1 <= prompt_len < max_len - 1, got prompt_len={prompt_len}, max_len={max_len}.")
    bos, eos, _ = _special_ids(tokenizer)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return [((head + enc + tail)[:max_len], len(head) + prompt_len) if len(enc) >= prompt_len + min_response
            else (None, 0) for enc in _encode(texts, tokenizer)]


def lm_data(source: str | Sequence[str] | TextStream, tokenizer: Any, prompt_len: int = 16, max_len: int = 128,
            val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, train_limit: int | None = None,
            val_limit: int | None = None, test_limit: int | None = None, *, store: str | Path | None = None,
            text_column: str | None = None, shard_tokens: int | None = None, log: Any = None) -> LMData:
    """LM data from a built-in text set (``"fortunes"``, ``"tweets"``, ``"brown"``) or a list of strings.

    Duplicate texts are removed first (so no test text is also a training text). The test rows are
    drawn with a fixed seed (the same for every ``seed``); validation is drawn from the rest with
    ``seed``; the limits then keep the first rows of each (already shuffled) split.

    With ``store`` (a folder, e.g. a run's cache) ``source`` may also be a file or datasets folder
    (:func:`attar.text.text_stream.text_stream`), read a chunk at a time: the rows are tokenised once into a token
    store there (:mod:`attar.text.row_store`, reused while the source, tokenizer and settings are unchanged) and the
    splits are :class:`~attar.text.row_store.RowView` views holding the same rows as without ``store``."""
    if store is not None:
        stream = text_stream(source, text_column)

        def chunks():
            for chunk in stream.chunks():
                made = _text_rows(chunk, tokenizer, prompt_len, max_len, 4)
                yield [(t.encode("utf-8", "surrogatepass"), r, p) for t, (r, p) in zip(chunk, made)]

        if prompt_len < 1 or max_len <= prompt_len + 1:  # refused before any store is made
            _text_rows(["x"], tokenizer, prompt_len, max_len, 4)
        ts, built = _row_store("texts", stream, tokenizer, store, chunks, _no_text_row(prompt_len, 4), log,
                               shard_tokens, max_len=max_len, prompt_len=prompt_len, min_response=4)
        index = ts.manifest.splits["rows"].index
        info = {"source": stream.name, "prompt_len": prompt_len, "max_len": max_len,
                "texts": ts.manifest.splits["rows"].texts, "dropped_short": index.dropped}
        return _stored_split(ts, tokenizer, info, built, val_fraction, test_fraction, seed, train_limit, val_limit,
                             test_limit)
    texts, name = _texts_of(source)
    split, dropped = lm_texts(texts, tokenizer, prompt_len, max_len)
    info = {"source": name, "prompt_len": prompt_len, "max_len": max_len, "texts": len(texts), "dropped_short": dropped}
    return split_lm_rows(split, tokenizer, info, val_fraction, test_fraction, seed, train_limit, val_limit, test_limit)


def lm_pair_data(prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, max_len: int = 128,
                 chat_template: bool = False, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                 train_limit: int | None = None, val_limit: int | None = None, test_limit: int | None = None,
                 name: str = "pairs") -> LMData:
    """SFT data: prompt/response rows (:func:`lm_pairs`, loss on the response only), split like :func:`lm_data`
    (duplicate pairs dropped first)."""
    pairs = list(dict.fromkeys((str(p), str(r)) for p, r in zip(prompts, responses) if str(r).strip()))
    if not pairs:
        raise AttarError(f"{name}: no prompt/response row has a non-empty response.")
    split = lm_pairs([p for p, _ in pairs], [r for _, r in pairs], tokenizer, max_len, chat_template)
    info = {"source": name, "max_len": max_len, "chat_template": chat_template, "texts": len(pairs), "dropped_short": 0}
    return split_lm_rows(split, tokenizer, info, val_fraction, test_fraction, seed, train_limit, val_limit, test_limit)


def lm_pair_store_data(pairs: Any, tokenizer: Any, store: str | Path, max_len: int = 128, chat_template: bool = False,
                       val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                       train_limit: int | None = None, val_limit: int | None = None, test_limit: int | None = None, *,
                       shard_tokens: int | None = None, chunk_rows: int = 1024, log: Any = None) -> LMData:
    """:func:`lm_pair_data` for a corpus read ``chunk_rows`` rows at a time and kept on disk: ``pairs`` (a
    :class:`attar.text.lm_io.PairStream`: ``chunks(size)`` of ``(prompts, responses)``, ``fingerprint()``) is
    tokenised once into a token store under ``store`` (:mod:`attar.text.row_store`), and the splits are
    :class:`~attar.text.row_store.RowView` views of the same rows, split the same way (with ``seed``)."""
    def chunks():
        seen = 0
        for prompts, responses in pairs.chunks(chunk_rows):
            kept = [(str(p), str(r)) for p, r in zip(prompts, responses) if str(r).strip()]
            if kept:
                rows, plen = _pair_rows([p for p, _ in kept], [r for _, r in kept], tokenizer, max_len, chat_template,
                                        seen)
                yield [(_pair_key(p, r), row, n) for (p, r), row, n in zip(kept, rows, plen)]
            seen += len(kept)

    ts, built = _row_store("pairs", pairs, tokenizer, store, chunks,
                           f"{pairs.name}: no prompt/response row has a non-empty response.", log, shard_tokens,
                           max_len=max_len, chat_template=chat_template)
    info = {"source": pairs.name, "max_len": max_len, "chat_template": chat_template,
            "texts": ts.manifest.splits["rows"].texts, "dropped_short": 0}
    return _stored_split(ts, tokenizer, info, built, val_fraction, test_fraction, seed, train_limit, val_limit,
                         test_limit)


def _pair_key(prompt: str, response: str) -> bytes:
    p = prompt.encode("utf-8", "surrogatepass")
    return len(p).to_bytes(8, "little") + p + response.encode("utf-8", "surrogatepass")


def _row_store(kind: str, source: Any, tokenizer: Any, root: str | Path, chunks: Any, empty: str, log: Any,
               shard_tokens: int | None, *, max_len: int, prompt_len: int | None = None, min_response: int | None = None,
               chat_template: bool = False) -> Any:
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 65535 else "uint32"
    bos, eos, _ = _special_ids(tokenizer)
    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest() if chat_template else None
    settings = RowStoreSettings(
        rows=kind, source=f"{source.kind}:{source.name}", source_sha256=source.fingerprint(),
        tokenizer=tokenizer_fingerprint(tokenizer), chat_template=template, vocab_size=vocab, bos_id=bos, eos_id=eos,
        max_len=max_len, prompt_len=prompt_len, min_response=min_response,
        shard_tokens=shard_tokens or SHARD_BYTES // np.dtype(dtype).itemsize, dtype=dtype)
    return row_store(source, settings, chunks, root, empty=empty, log=log)


def _stored_split(ts: Any, tokenizer: Any, info: dict[str, Any], built: bool, val_fraction: float,
                  test_fraction: float, seed: int, train_limit: int | None, val_limit: int | None,
                  test_limit: int | None) -> LMData:
    pad = _special_ids(tokenizer)[2]
    n = ts.manifest.splits["rows"].blocks
    idx = split_index(n, val_fraction, test_fraction, seed, train_limit, val_limit, test_limit)
    train, val, test = (RowView(ts, i, pad) for i in idx)
    return _lm_data(train, val, test, tokenizer, info | {"store": str(ts.folder), "store_built": built})


def lm_packed(texts: Sequence[str], tokenizer: Any, block: int) -> LMSplit:
    """Texts joined end to end (``[BOS] text [EOS]`` each) and cut into rows of exactly ``block`` tokens, every token
    after a row's first scored: the usual way to train on running text without padding. The last partial row is
    dropped."""
    if block < 2:
        raise AttarError(f"packing needs blocks of at least 2 tokens, got max_len={block}.")
    bos, eos, pad = _special_ids(tokenizer)
    stream: list[int] = []
    for enc in _encode(texts, tokenizer):
        stream += ([bos] if bos is not None else []) + enc + ([eos] if eos is not None else [])
    n = len(stream) // block
    if n == 0:
        raise AttarError(f"packing: {len(stream)} tokens make no full block of max_len={block}; lower max_len.")
    ids = torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return LMSplit(ids, mask, torch.ones(n, dtype=torch.long))


def lm_packed_data(source: str | Sequence[str] | TextStream, tokenizer: Any, max_len: int = 128,
                   val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0, train_limit: int | None = None,
                   val_limit: int | None = None, test_limit: int | None = None, *, store: str | Path | None = None,
                   text_column: str | None = None, log: Any = None) -> LMData:
    """Packed LM data (:func:`lm_packed`): each text goes to train/val/test by a hash of its content
    (:func:`attar.text.token_store.split_of`: the same for every seed, duplicates in one split), then each split's
    texts are packed in source order, so no block mixes test and training text. The limits count blocks; ``seed``
    does not change the split (the Trainer draws the order of the blocks from it).

    ``source``: a built-in set, a file or datasets folder (:func:`attar.text.text_stream.text_stream`), or a list of
    texts. Without ``store`` the blocks are tensors in memory. With ``store`` (a folder, e.g. a run's cache) they
    are tokenised once into memory-mapped shards there (:mod:`attar.text.token_store`, reused while the source,
    tokenizer and settings are unchanged) and the splits are :class:`~attar.text.token_store.PackedBlocks` views
    that read only the rows asked for: the same rows as without ``store``, for a corpus of any size."""
    if max_len < 2:
        raise AttarError(f"packing needs blocks of at least 2 tokens, got max_len={max_len}.")
    stream = text_stream(source, text_column)
    _, eos, pad = _special_ids(tokenizer)
    if store is not None:
        ts, built = token_store(stream, tokenizer, store, max_len, val_fraction, test_fraction, log=log)
        train, val, test = (ts.split("train", train_limit), ts.split("val", val_limit), ts.split("test", test_limit))
        texts = sum(s.texts for s in ts.manifest.splits.values())
        extra = {"store": str(ts.folder), "store_built": built}
    else:
        by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for chunk in stream.chunks():
            for t in chunk:
                by_split[split_of(t, val_fraction, test_fraction)].append(t)
        parts = {}
        for name, lim in (("train", train_limit), ("val", val_limit), ("test", test_limit)):
            try:
                packed = lm_packed(by_split[name], tokenizer, max_len)
            except AttarError:
                if name != "val":
                    raise AttarError(f"packing {stream.where}: its {name} texts ({len(by_split[name])}) make no "
                                     f"full block of max_len={max_len} tokens; lower max_len or bring more text.") from None
                packed = LMSplit(torch.zeros(0, max_len, dtype=torch.long), torch.zeros(0, max_len, dtype=torch.bool),
                                 torch.zeros(0, dtype=torch.long))
            parts[name] = packed.slice(0, lim) if lim else packed
        train, val, test = parts["train"], parts["val"], parts["test"]
        texts = sum(len(v) for v in by_split.values())
        extra = {}
    info = {"source": stream.name, "packed": True, "max_len": max_len, "texts": texts,
            "sizes": {"train": len(train), "val": len(val), "test": len(test)},
            "response_tokens": {"train": train.response_tokens, "val": val.response_tokens, "test": test.response_tokens}}
    return LMData(train, val, test, pad, eos, info | extra)


def _texts_of(source: str | Sequence[str]) -> tuple[list[str], str]:
    """Distinct non-blank texts of a built-in text set or a list of strings, and a name for them."""
    if isinstance(source, str):
        from attar.text.sources import TEXT_BUILTINS

        texts, name = list(TEXT_BUILTINS.get(source).load().texts), source
    else:
        texts, name = [str(t) for t in source], "texts"
    return list(dict.fromkeys(t for t in texts if t.strip())), name


def split_lm_rows(split: LMSplit, tokenizer: Any, info: dict[str, Any], val_fraction: float, test_fraction: float,
                  seed: int, train_limit: int | None, val_limit: int | None, test_limit: int | None) -> LMData:
    """Train/val/test rows: the test rows fixed for every seed, validation drawn with ``seed``, then the limits."""
    idx = split_index(len(split), val_fraction, test_fraction, seed, train_limit, val_limit, test_limit)
    train, val, test = (split.rows(torch.as_tensor(i, dtype=torch.long)) for i in idx)
    return _lm_data(train, val, test, tokenizer, info)


def split_index(n: int, val_fraction: float, test_fraction: float, seed: int, train_limit: int | None,
                val_limit: int | None, test_limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train, val and test row numbers of ``n`` rows (:func:`split_lm_rows`): the test rows a function of ``n``
    alone, validation drawn from the rest with ``seed``, each cut to its limit."""
    n_test = max(1, int(round(n * test_fraction)))
    n_val = int(round(n * val_fraction))
    if n_test + n_val >= n:
        raise AttarError(f"lm_data: {n} usable texts are too few for test_fraction={test_fraction} and val_fraction={val_fraction}.")
    perm = np.random.default_rng(_TEST_SEED + 7919).permutation(n)
    test_idx, pool = perm[:n_test], perm[n_test:]
    pool = pool[np.random.default_rng(seed + 104729).permutation(len(pool))]
    val_idx, train_idx = pool[:n_val], pool[n_val:]
    cut = lambda idx, lim: idx[:lim] if lim else idx  # noqa: E731
    return cut(train_idx, train_limit), cut(val_idx, val_limit), cut(test_idx, test_limit)


def _lm_data(train: Any, val: Any, test: Any, tokenizer: Any, info: dict[str, Any]) -> LMData:
    _, eos, pad = _special_ids(tokenizer)
    info = info | {"sizes": {"train": len(train), "val": len(val), "test": len(test)},
                   "response_tokens": {"train": train.response_tokens, "val": val.response_tokens,
                                       "test": test.response_tokens}}
    return LMData(train, val, test, pad, eos, info)
