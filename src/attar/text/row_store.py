"""Rows of their own length in a token store: prompt/response (SFT) pairs and prompt + continuation rows of plain
text, tokenised once onto disk and read a batch at a time, so a corpus larger than memory trains a language model.

**The rows are today's in-memory rows.** The builders in :mod:`attar.text.charlm` make each row the way the
in-memory path does (one function for both) and hand them here a chunk at a time, with what makes a row distinct
(its text, or its prompt and response). The store keeps every distinct row once, in source order (the first
occurrence wins, as ``dict.fromkeys`` does in memory), so row ``i`` of the store is row ``i`` of the in-memory
rows, and the same train/val/test indices (:func:`attar.text.charlm.split_index`: the test rows fixed, validation
drawn with the seed) pick the same rows. The split is therefore not stored: one store serves every seed.

**On disk** (the layout of :mod:`attar.text.token_store`, one split named ``rows``): the rows' tokens end to end in
``rows-NNNNN.bin`` shards (uint16/uint32), ``rows-offsets.bin`` (int64 ``(start, length)`` per row) and
``rows-prompt.bin`` (int32 prompt length per row), all three with their sha256 in ``manifest.json``
(:class:`~attar.text.token_store.RowIndex`), beside :class:`~attar.text.token_store.RowStoreSettings`. The build is
staged (a kill leaves no store that is read), reused while the manifest's settings match, and a damaged file is
refused by name (:meth:`TokenStore.open <attar.text.token_store.TokenStore.open>`).

**Duplicates** are found without holding the texts: each row's 128-bit blake2b digest goes to a staging file with
its offsets, and once the corpus is read the first occurrence of each digest is kept (a sort of 16 bytes a row).
A duplicate's tokens stay in the stream unreferenced: they cost disk, not correctness.

**Reading** (:class:`RowView`): the ``LMSplit`` calls; ``rows(idx)`` reads just those rows and right-pads them to
the store's longest row, the width the in-memory rows have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from attar.errors import AttarError
from attar.io import atomic_write_json, staged_folder
from attar.text.lm_split import LMSplit
from attar.text.token_store import (
    Manifest,
    RowIndex,
    RowStoreSettings,
    ShardInfo,
    ShardReader,
    TokenStore,
    _ShardWriter,
    open_or_build,
    store_folder,
)

__all__ = ["Row", "row_store", "RowView"]

Row = tuple[bytes, "list[int] | None", int]  # (what makes it distinct, its ids or None when too short, prompt length)
_CANDIDATE = np.dtype([("start", "<i8"), ("length", "<i8"), ("plen", "<i4"), ("key", "<u8", (2,))])
_GATHER = 1 << 20  # rows gathered at a time when the index is written


def _first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Sorted positions of the first row of each distinct 128-bit key (``keys``: ``[n, 2]`` uint64)."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal keys keep their source order
    s = keys[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = (s[1:] != s[:-1]).any(1)
    return np.sort(order[first])


def _write_array(path: Path, parts: Iterable[np.ndarray]) -> ShardInfo:
    sha, n = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for a in parts:
            data = np.ascontiguousarray(a).tobytes()
            f.write(data)
            sha.update(data)
            n += len(a)
    return ShardInfo(file=path.name, tokens=n, sha256=sha.hexdigest())


def _build(chunks: Iterable[list[Row]], folder: Path, settings: RowStoreSettings, empty: str) -> None:
    with staged_folder(folder) as tmp:
        writer = _ShardWriter(tmp, "rows", np.dtype(settings.dtype).newbyteorder("<"), settings.shard_tokens)
        cand_path = tmp / "candidates.tmp"
        with open(cand_path, "wb") as cf:
            for chunk in chunks:
                rec = np.zeros(len(chunk), dtype=_CANDIDATE)
                for i, (key, ids, plen) in enumerate(chunk):
                    rec["key"][i] = np.frombuffer(hashlib.blake2b(key, digest_size=16).digest(), dtype="<u8")
                    if ids is None:
                        rec["length"][i] = -1  # a distinct text all the same (counted), but no row
                        continue
                    rec["start"][i], rec["length"][i], rec["plen"][i] = writer.position, len(ids), plen
                    writer.add(ids)
                cf.write(rec.tobytes())
        cand = np.memmap(cand_path, dtype=_CANDIDATE, mode="r") if cand_path.stat().st_size else \
            np.zeros(0, dtype=_CANDIDATE)
        keep = _first_occurrences(np.asarray(cand["key"]))
        lengths = np.asarray(cand["length"][keep])
        rows = keep[lengths >= 0]
        if len(rows) == 0:
            raise AttarError(empty)
        width = int(lengths.max())
        parts = [rows[a : a + _GATHER] for a in range(0, len(rows), _GATHER)]
        offsets = _write_array(tmp / "rows-offsets.bin",
                               (np.stack([cand["start"][r], cand["length"][r]], 1).astype("<i8") for r in parts))
        prompt = _write_array(tmp / "rows-prompt.bin", (cand["plen"][r].astype("<i4") for r in parts))
        del cand  # the memory map is closed before its file is removed
        cand_path.unlink()
        info = writer.close(len(keep), 1).model_copy(update={"blocks": len(rows), "index": RowIndex(
            rows=len(rows), width=width, dropped=len(keep) - len(rows), offsets=offsets, prompt=prompt)})
        atomic_write_json(tmp / "manifest.json", Manifest(settings=settings, splits={"rows": info}).model_dump())


def row_store(source: Any, settings: RowStoreSettings, chunks: Callable[[], Iterable[list[Row]]], root: str | Path,
              *, empty: str, verify: bool = True, log: Callable[[str], None] | None = None) -> tuple[TokenStore, bool]:
    """The store of ``source``'s rows under ``root``: reused when its manifest's settings equal ``settings``, else
    built from ``chunks()`` (lists of :data:`Row`, in source order). ``source`` names the data (``kind``, ``name``,
    ``column``: a :class:`~attar.text.text_stream.TextStream` or a pair stream); ``empty``: the error when no row
    is left. Returns ``(store, built)``."""
    folder = store_folder(root, source, settings)
    return open_or_build(folder, settings, lambda: _build(chunks(), folder, settings, empty), verify=verify, log=log)


class RowView(ShardReader):
    """Some rows of a row store (``index``: their numbers in the store) with the ``LMSplit`` calls of
    :mod:`attar.text.lm_split`; nothing is read until rows are asked for."""

    def __init__(self, store: TokenStore, index: Any, pad_id: int):
        info = store.manifest.splits["rows"]
        if info.index is None:
            raise AttarError(f"token store {store.folder} holds packed blocks, not rows.")
        st = store.settings
        super().__init__([store.folder / s.file for s in info.shards], st.shard_tokens, np.dtype(st.dtype).newbyteorder("<"))
        self.store, self.pad_id, self.row_index = store, int(pad_id), info.index
        self.index = np.asarray(index, dtype=np.int64).reshape(-1)
        if len(self.index) and (int(self.index.min()) < 0 or int(self.index.max()) >= info.index.rows):
            raise IndexError(f"row index out of range 0..{info.index.rows - 1}")
        self._offsets = np.memmap(store.folder / info.index.offsets.file, dtype="<i8", mode="r",
                                  shape=(info.index.rows, 2)) if info.index.rows else np.zeros((0, 2), np.int64)
        self._plen = np.memmap(store.folder / info.index.prompt.file, dtype="<i4", mode="r",
                               shape=(info.index.rows,)) if info.index.rows else np.zeros(0, np.int32)
        self._digest = "".join(s.sha256 for s in info.shards) + info.index.offsets.sha256 + info.index.prompt.sha256
        self._response_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def width(self) -> int:
        return self.row_index.width

    @property
    def prompt_len(self) -> torch.Tensor:
        return torch.from_numpy(self._plen[self.index].astype(np.int64))

    @property
    def response_tokens(self) -> int:
        if self._response_tokens is None:
            self._response_tokens = sum(int((self._offsets[part, 1] - self._plen[part]).sum())
                                        for part in np.array_split(self.index, max(1, len(self.index) // _GATHER)))
        return self._response_tokens

    def select(self, idx: Any) -> "RowView":
        """These rows of this view (positions in it), as a view."""
        return RowView(self.store, self.index[np.asarray(idx, dtype=np.int64)], self.pad_id)

    def head(self, n: int | None) -> "RowView":
        """The first ``n`` rows (all when ``n`` is None)."""
        return self if n is None else self.select(np.arange(min(int(n), len(self))))

    def fingerprint(self) -> str:
        """Names these exact rows (the store's files' sha256, the width and the rows' numbers): what a teacher cache
        records."""
        h = hashlib.sha256(f"{self._digest}:{self.width}:".encode())
        h.update(self.index.astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def rows(self, idx: Any) -> LMSplit:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        which = self.index[idx.numpy()]
        ids = np.full((len(which), self.width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(which), self.width), dtype=bool)
        plen = self._plen[which].astype(np.int64)
        for k, (start, length) in enumerate(self._offsets[which].tolist()):
            ids[k, :length] = self._read(start, length)
            mask[k, plen[k] : length] = True
        return LMSplit(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(plen))

    def slice(self, start: int, stop: int) -> LMSplit:
        start, stop = max(0, start), min(stop, len(self))
        return self.rows(torch.arange(start, max(start, stop)))
