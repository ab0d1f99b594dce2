"""Memory-mapped token shards: a corpus tokenised once onto disk and read a block at a time, so a text larger than
memory trains a language model.

**Splitting.** Each text goes to ``test``, ``val`` or ``train`` by a hash of its content (:func:`split_of`): the same
text always lands in the same split (duplicates can never put a test text into training), the held-out texts are the
same for every seed and every corpus size, and no count or shuffle of the whole corpus is needed. Within a split the
texts keep their source order, each as ``[BOS] text [EOS]``, and the split's token stream is cut into blocks of
``block`` tokens (the last partial block is not read): the rows of ``pack: true``.

**On disk** (``<root>/<source>-<key>/``): per split, flat little-endian ``uint16`` files (``uint32`` when the
vocabulary exceeds 65,535 tokens) of at most ``shard_tokens`` tokens each (256 MiB by default), and
``manifest.json``: the settings (tokenizer fingerprint, vocabulary size, BOS/EOS, dtype, block, split fractions,
source sha256), and per split its texts, tokens, blocks and each shard's tokens and sha256.

**Building** (:func:`token_store`) reads the source a chunk of texts at a time and writes as it goes, so neither the
texts nor their ids are ever all in memory. Everything is written into a hidden staging folder renamed into place
when complete (:func:`attar.io.staged_folder`): a kill while building leaves no store that is ever read (a hidden
``.<name>.*.tmp`` folder may remain; delete it). A store is reused while its manifest's settings equal the wanted
ones (same source content, tokenizer and settings) and rebuilt otherwise.

**Reading** (:class:`PackedBlocks`): ``len()`` from the manifest, ``rows(idx)``/``slice(a, b)`` gather just those
blocks from the shards through ``np.memmap`` (across shard boundaries) as int64 tensors. Opening checks every
shard's size and sha256 (about a second per GB): a truncated or changed shard is refused, naming the file and the
fix (delete the store's folder; the next run rebuilds it).

**Rows of their own length** (prompt/response pairs, prompt + continuation rows) use the same shards, manifest,
staged build and checks with :class:`RowStoreSettings` and one ``rows`` entry whose :class:`RowIndex` names two more
hashed files: each row's ``(start, length)`` in the token stream and its prompt length; :mod:`attar.text.row_store`
builds and reads them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from attar.errors import AttarError
from attar.io import atomic_write_json, sha256_file, staged_folder
from attar.text.lm_split import LMSplit, special_ids
from attar.text.text_stream import TextStream

STORE_FORMAT = "attar-token-store/1"
SPLITS = ("train", "val", "test")
SHARD_BYTES = 256 * 2**20
FLUSH_TOKENS = 1 << 16  # tokens buffered before they are written


# ---------------------------------------------------------------------------------------------- the split rule


def _unit(text: str, salt: bytes) -> float:
    d = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=salt).digest()
    return int.from_bytes(d, "little") / 2**64


def split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    """``test`` with probability ``test_fraction``, else ``val`` with ``val_fraction`` of all texts, else ``train``:
    a function of the text alone (module doc)."""
    if _unit(text, b"attar-test") < test_fraction:
        return "test"
    if val_fraction and _unit(text, b"attar-val") < val_fraction / max(1e-12, 1 - test_fraction):
        return "val"
    return "train"


# ---------------------------------------------------------------------------------------------- the manifest


class StoreSettings(BaseModel):
    """What a store was built from and for; a store is reused only when all of it matches."""

    model_config = ConfigDict(extra="forbid")

    source: str
    source_sha256: str
    tokenizer: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    block: int
    val_fraction: float
    test_fraction: float
    shard_tokens: int
    dtype: Literal["uint16", "uint32"]


class RowStoreSettings(BaseModel):
    """What a store of variable-length rows was built from (:mod:`attar.text.row_store`): the rows' kind and the
    settings that shape each row. The train/val/test split is not among them: it is drawn when the store is read."""

    model_config = ConfigDict(extra="forbid")

    layout: Literal["rows"] = "rows"
    rows: Literal["pairs", "texts"]
    source: str
    source_sha256: str
    tokenizer: str
    chat_template: str | None  # sha256 of the template the prompts were wrapped in (pairs with chat_template)
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    max_len: int
    prompt_len: int | None  # texts: the fixed prompt length
    min_response: int | None
    shard_tokens: int
    dtype: Literal["uint16", "uint32"]


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    tokens: int
    sha256: str


class RowIndex(BaseModel):
    """A row store's index: ``offsets`` holds ``rows`` pairs of int64 ``(start, length)`` into the token stream,
    ``prompt`` ``rows`` int32 prompt lengths (each file's ``tokens`` is its number of entries)."""

    model_config = ConfigDict(extra="forbid")

    rows: int
    width: int  # the longest row: every row is read right-padded to it, as the in-memory rows are
    dropped: int  # distinct texts too short to make a row
    offsets: ShardInfo
    prompt: ShardInfo


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: int
    tokens: int
    blocks: int  # a row store: its rows
    shards: list[ShardInfo]
    index: RowIndex | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["attar-token-store/1"] = STORE_FORMAT
    settings: StoreSettings | RowStoreSettings
    splits: dict[str, SplitInfo]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the ids: the tokenizer's rules and vocabulary and its special tokens."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """One split's token stream into ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens, hashed as written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.buf: list[int] = []
        self.shards: list[ShardInfo] = []
        self.file, self.sha, self.in_shard, self.tokens = None, None, 0, 0

    @property
    def position(self) -> int:
        """Where the next token goes in the split's stream."""
        return self.tokens + len(self.buf)

    def add(self, ids: list[int]) -> None:
        self.buf += ids
        if len(self.buf) >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        arr = np.asarray(self.buf, dtype=np.int64)
        self.buf = []
        if len(arr) and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(self.dtype).max):
            raise AttarError(f"token store: the tokenizer produced id {int(arr.max())}, which does not fit "
                             f"{np.dtype(self.dtype).name}; its vocabulary size is wrong.")
        arr = arr.astype(self.dtype)
        pos = 0
        while pos < len(arr):
            if self.file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.file, self.sha, self.in_shard = open(self.folder / name, "wb"), hashlib.sha256(), 0
                self.shards.append(ShardInfo(file=name, tokens=0, sha256=""))
            take = min(len(arr) - pos, self.shard_tokens - self.in_shard)
            data = arr[pos : pos + take].tobytes()
            self.file.write(data)
            self.sha.update(data)
            self.in_shard += take
            self.tokens += take
            pos += take
            if self.in_shard == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self.file.close()
        self.shards[-1] = ShardInfo(file=self.shards[-1].file, tokens=self.in_shard, sha256=self.sha.hexdigest())
        self.file = None

    def close(self, texts: int, block: int) -> SplitInfo:
        self._flush()
        if self.file is not None:
            self._close_shard()
        return SplitInfo(texts=texts, tokens=self.tokens, blocks=self.tokens // block, shards=self.shards)


def _build(stream: TextStream, tokenizer: Any, folder: Path, settings: StoreSettings, chunk_texts: int) -> None:
    bos, eos, _ = special_ids(tokenizer)
    head, tail = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
    with staged_folder(folder) as tmp:
        writers = {s: _ShardWriter(tmp, s, np.dtype(settings.dtype).newbyteorder("<"), settings.shard_tokens)
                   for s in SPLITS}
        texts = dict.fromkeys(SPLITS, 0)
        for chunk in stream.chunks(chunk_texts):
            for text, ids in zip(chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"]):
                s = split_of(text, settings.val_fraction, settings.test_fraction)
                writers[s].add(head + list(ids) + tail)
                texts[s] += 1
        splits = {s: w.close(texts[s], settings.block) for s, w in writers.items()}
        for s in ("train", "test"):
            if splits[s].blocks == 0:
                raise AttarError(f"packing {stream.where}: its {s} texts ({splits[s].texts} of "
                                 f"{sum(texts.values())}, {splits[s].tokens} tokens) make no full block of "
                                 f"max_len={settings.block} tokens; lower max_len or bring more text.")
        atomic_write_json(tmp / "manifest.json", Manifest(settings=settings, splits=splits).model_dump())


# ---------------------------------------------------------------------------------------------- reading


def _refuse(folder: Path, what: str) -> AttarError:
    return AttarError(f"token store {folder}: {what}. The store was changed or damaged after it was built; delete the "
                      f"folder {folder} and run again to rebuild it from the text.")


class ShardReader:
    """A split's token stream across its shards, mapped (``np.memmap``) only when first read."""

    def __init__(self, files: list[Path], shard_tokens: int, dtype: np.dtype):
        self.files, self.shard_tokens, self.dtype = files, shard_tokens, dtype
        self._maps: list[np.memmap | None] = [None] * len(files)
        self.texts: list[str] = []

    def _map(self, s: int) -> np.memmap:
        if self._maps[s] is None:
            self._maps[s] = np.memmap(self.files[s], dtype=self.dtype, mode="r")
        return self._maps[s]

    def _read(self, start: int, count: int) -> np.ndarray:
        """Tokens ``start:start+count`` of the split's stream, across shards, as int64."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            s, off = divmod(start + done, self.shard_tokens)
            take = min(count - done, self.shard_tokens - off)
            out[done : done + take] = self._map(s)[off : off + take]
            done += take
        return out


class PackedBlocks(ShardReader):
    """A split of a token store as ``block``-token rows, every token after a row's first scored (the ``LMSplit``
    calls of :mod:`attar.text.lm_split`); nothing is read until rows are asked for."""

    def __init__(self, files: list[Path], shard_tokens: int, dtype: np.dtype, block: int, blocks: int, digest: str):
        super().__init__(files, shard_tokens, dtype)
        self.block, self.blocks, self._digest = block, blocks, digest

    def __len__(self) -> int:
        return self.blocks

    @property
    def width(self) -> int:
        return self.block

    @property
    def prompt_len(self) -> torch.Tensor:
        return torch.ones(self.blocks, dtype=torch.long)

    @property
    def response_tokens(self) -> int:
        return self.blocks * (self.block - 1)

    def head(self, n: int | None) -> "PackedBlocks":
        """The first ``n`` blocks (all when ``n`` is None)."""
        n = self.blocks if n is None else min(int(n), self.blocks)
        return PackedBlocks(self.files, self.shard_tokens, self.dtype, self.block, n, self._digest)

    def fingerprint(self) -> str:
        """Names these exact rows (the shards' sha256, block and count): what a teacher cache records."""
        return hashlib.sha256(f"{self._digest}:{self.block}:{self.blocks}".encode()).hexdigest()[:16]

    def _split(self, ids: np.ndarray) -> LMSplit:
        t = torch.from_numpy(ids)
        mask = torch.ones_like(t, dtype=torch.bool)
        mask[:, 0] = False
        return LMSplit(t, mask, torch.ones(len(t), dtype=torch.long))

    def rows(self, idx: Any) -> LMSplit:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.blocks):
            raise IndexError(f"block index out of range 0..{self.blocks - 1}")
        out = np.empty((len(idx), self.block), dtype=np.int64)
        for k, r in enumerate(idx.tolist()):
            out[k] = self._read(r * self.block, self.block)
        return self._split(out)

    def slice(self, start: int, stop: int) -> LMSplit:
        start, stop = max(0, start), min(stop, self.blocks)
        n = max(0, stop - start)
        return self._split(self._read(start * self.block, n * self.block).reshape(n, self.block))


class TokenStore:
    """An opened store: its manifest and a :class:`PackedBlocks` per split (:meth:`split`)."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.folder, self.manifest = folder, manifest

    @property
    def settings(self) -> StoreSettings:
        return self.manifest.settings

    def split(self, name: str, limit: int | None = None) -> PackedBlocks:
        st = self.settings
        if isinstance(st, RowStoreSettings):
            raise AttarError(f"token store {self.folder} holds rows of their own length, not packed blocks; read it "
                             "with attar.text.row_store.RowView.")
        info = self.manifest.splits[name]
        digest = hashlib.sha256("".join(s.sha256 for s in info.shards).encode()).hexdigest()
        return PackedBlocks([self.folder / s.file for s in info.shards], st.shard_tokens,
                            np.dtype(st.dtype).newbyteorder("<"), st.block, info.blocks, digest).head(limit)

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True) -> "TokenStore":
        """Read the manifest and check every shard's size (and with ``verify`` its sha256) against it."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest is None:
            raise _refuse(folder, "manifest.json is missing or not a token-store manifest")
        itemsize = np.dtype(manifest.settings.dtype).itemsize
        for split in manifest.splits.values():
            files = [(s, itemsize, "tokens") for s in split.shards]
            if split.index is not None:  # a row store's (start, length) pairs and prompt lengths
                files += [(split.index.offsets, 16, "rows"), (split.index.prompt, 4, "rows")]
            for s, size, unit in files:
                f = folder / s.file
                if not f.is_file():
                    raise _refuse(folder, f"the shard {f.name} is missing")
                if f.stat().st_size != s.tokens * size:
                    raise _refuse(folder, f"the shard {f.name} holds {f.stat().st_size} bytes, the manifest says "
                                          f"{s.tokens * size} ({s.tokens} {unit}): it is truncated or changed")
                if verify and sha256_file(f) != s.sha256:
                    raise _refuse(folder, f"the shard {f.name} does not have the sha256 the manifest records")
        return cls(folder, manifest)


def read_manifest(folder: Path) -> Manifest | None:
    try:
        return Manifest.model_validate_json((Path(folder) / "manifest.json").read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- build or reuse


def store_folder(root: str | Path, stream: TextStream, settings: StoreSettings) -> Path:
    """``<root>/<source>-<key>``: the key names the source (not its content), tokenizer and settings, so a changed
    file rebuilds its own store in place and other settings get a store of their own."""
    ident = settings.model_dump(exclude={"source_sha256"}) | {"kind": stream.kind, "column": stream.column}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(stream.name).name)[:40].strip("._") or "texts"
    return Path(root) / f"{slug}-{key}"


def token_store(stream: TextStream, tokenizer: Any, root: str | Path, block: int, val_fraction: float = 0.1,
                test_fraction: float = 0.1, shard_tokens: int | None = None, chunk_texts: int = 1024,
                verify: bool = True, log: Callable[[str], None] | None = None) -> tuple[TokenStore, bool]:
    """The store of ``stream`` tokenised by ``tokenizer`` in blocks of ``block`` under ``root``: reused when its
    manifest matches, built (or rebuilt) otherwise. Returns ``(store, built)``."""
    if block < 2:
        raise AttarError(f"packing needs blocks of at least 2 tokens, got max_len={block}.")
    vocab = len(tokenizer)
    dtype = "uint16" if vocab <= 65535 else "uint32"
    bos, eos, _ = special_ids(tokenizer)
    settings = StoreSettings(
        source=f"{stream.kind}:{stream.name}", source_sha256=stream.fingerprint(), tokenizer=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab, bos_id=bos, eos_id=eos, block=block, val_fraction=val_fraction, test_fraction=test_fraction,
        shard_tokens=shard_tokens or SHARD_BYTES // np.dtype(dtype).itemsize, dtype=dtype)
    folder = store_folder(root, stream, settings)
    return open_or_build(folder, settings, lambda: _build(stream, tokenizer, folder, settings, chunk_texts),
                         verify=verify, log=log)


def open_or_build(folder: Path, settings: Any, build: Callable[[], None], *, verify: bool = True,
                  log: Callable[[str], None] | None = None) -> tuple[TokenStore, bool]:
    """The store in ``folder`` when its manifest's settings equal ``settings``; otherwise ``build()`` (staged, so a
    kill leaves no torn store) and open what it wrote. Returns ``(store, built)``; packed and row stores share it."""
    found = read_manifest(folder)
    if found is not None and found.settings == settings:
        return TokenStore.open(folder, verify=verify), False
    if log is not None:
        log(f"  token store: {'rebuilding' if folder.exists() else 'building'} {folder}")
    build()
    return TokenStore.open(folder, verify=False), True
