"""Stored teacher outputs: a teacher's top-k log-probabilities per token (LMs) or per example (classifiers), compressed
into shards on disk, so a teacher runs once and every later use reads its outputs (distillation, relabelling, data
selection).

**What is kept per position** (a token of an LM row, or the one position of a classifier example): the ids of the
teacher's ``k`` most likely classes/tokens, their log-probabilities and the log of the **tail mass** (what the other
``V − k`` hold). A position's log-probs are rebuilt as a proper distribution over ``k + 1`` buckets.

**Encoding** (per position, then zstd over a shard):

* *log-probs*: ``code_i = round((log p_1 − log p_i) / step)`` clipped to ``[0, 255]`` (one byte each, relative to the
  top-1; ``step`` in nats, default 1/16). Reading rebuilds ``u_i = −code_i·step`` and renormalises the k values so
  they hold exactly ``1 − tail`` of the mass. **Max error**: every rebuilt ``log p_i`` is within ``step`` of the
  teacher's (``step/2`` from rounding the difference to the top-1, at most ``step/2`` more from the renormalisation,
  plus the tail's float16 rounding, ``< 1e-3`` relative on ``1 − tail``), for entries within ``255·step`` nats of the
  top-1 (16 nats at the default: ``p_i < 1.2e-7·p_1`` below that, stored at the bound).
* *ids*: sorted ascending within a position, then the gaps ``id_0, id_1 − id_0 − 1, ...`` as LEB128 varints (the
  log-prob codes are stored in the same id order, so rank order costs nothing: it is the order of the values).
* *tail*: ``log(1 − Σ_topk p)`` as float16 (exact in the k = V case: ``−inf``).
* ``values: f32`` (instead of the default ``q8`` above): log-probs and tail stored as float32, exact. For
  classifier stores (ten to a thousand classes, one position per example: bytes hardly matter), where a store with
  ``k`` = the number of classes then gives the same KD targets as the live teacher.
* which positions of a row are stored: a bit mask ``[rows, width]`` (LMs keep only the scored positions).

A shard is a small header and four zstd frames, one per section (mask bits, tails, codes, varint ids):
separate frames compress 7% better than one.

**On disk**: ``<store>/shard-NNNNN.zst`` of ``shard_rows`` consecutive rows each and ``manifest.json``: the settings
(teacher name and weights hash, tokenizer fingerprint and vocabulary size, temperature, k, step, the data's hash
and description, rows and width) and per shard its rows, positions, bytes and sha256. Shards are written whole
(temp file + rename) and the manifest is rewritten (atomically) after each, so a killed dump keeps its finished
shards and a resumed one skips them (:class:`StoreWriter`); the manifest says ``complete`` only at the end.

**Reading** (:class:`TeacherStore`): opening checks that the store is complete and every shard's size and sha256 (a
truncated or changed shard is refused naming the file, and never decoded); ``dense(rows, width)`` /
``positions(rows)`` decode just the shards those rows live in (a small LRU of decoded shards).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from attar.errors import AttarError
from attar.io import atomic_write_bytes, atomic_write_json, sha256_file

STORE_FORMAT = "attar-teacher-store/1"
MAGIC = b"ATS1"
DEFAULT_STEP = 1.0 / 16
MAX_CODE = 255
_HEADER = struct.Struct("<4sIIIIQQQQ")  # magic, rows, width, positions, k, then the 4 sections' bytes


# ---------------------------------------------------------------------------------------------- the manifest


class StoreSettings(BaseModel):
    """What a store was made from and for; a resumed dump must match all of it, a reader compares parts of it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["lm", "classifier"] = "lm"
    teacher: str = ""
    teacher_hash: str = ""
    tokenizer: str = ""
    vocab_size: int
    k: int
    temperature: float = 1.0
    step: float = DEFAULT_STEP
    values: Literal["q8", "f32"] = "q8"
    data: str = ""
    data_hash: str = ""
    rows: int
    width: int
    shard_rows: int
    zstd_level: int = 9


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    rows: int
    positions: int
    bytes: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["attar-teacher-store/1"] = STORE_FORMAT
    settings: StoreSettings
    shards: list[ShardInfo] = []
    complete: bool = False

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


def read_manifest(folder: str | Path) -> Manifest | None:
    try:
        return Manifest.model_validate_json((Path(folder) / "manifest.json").read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def settings_diff(have: StoreSettings, want: StoreSettings) -> list[str]:
    """``field: stored vs wanted`` for every setting that differs."""
    a, b = have.model_dump(), want.model_dump()
    return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]


# ---------------------------------------------------------------------------------------------- varints


def _varint_encode(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers below 2**35, vectorised."""
    a = values.astype(np.uint64).ravel()
    if len(a) == 0:
        return b""
    nb = np.ones(len(a), dtype=np.int64)
    for s in (7, 14, 21, 28):
        nb += a >= (1 << s)
    out = np.zeros(int(nb.sum()), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(nb)[:-1]])
    for j in range(int(nb.max())):
        sel = nb > j
        b = ((a[sel] >> np.uint64(7 * j)) & np.uint64(127)).astype(np.uint8)
        b[nb[sel] > j + 1] |= 128
        out[starts[sel] + j] = b
    return out.tobytes()


def _varint_decode(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8)
    ends = b < 128
    if int(ends.sum()) != count:
        raise ValueError(f"varint section holds {int(ends.sum())} values, {count} expected")
    which = np.concatenate([[0], np.cumsum(ends)[:-1]])  # the value each byte belongs to
    first = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])  # each value's first byte
    shift = 7 * (np.arange(len(b)) - first[which])
    return np.bincount(which, weights=(b & 127).astype(np.float64) * np.exp2(shift), minlength=count).astype(np.int64)


# ---------------------------------------------------------------------------------------------- quantisation


def quantise(top_logp: np.ndarray, step: float) -> np.ndarray:
    """``[n, k]`` log-probs in descending order -> uint8 codes ``round((top-1 − value) / step)``, clipped to 255."""
    d = (top_logp[:, :1] - top_logp) / step
    return np.clip(np.rint(np.nan_to_num(d, nan=MAX_CODE, posinf=MAX_CODE)), 0, MAX_CODE).astype(np.uint8)


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """``log(1 − exp(x))`` for ``x <= 0``, accurate at both ends (``−inf`` -> 0)."""
    x = np.minimum(x, -1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def dequantise(codes: np.ndarray, rest: np.ndarray, step: float) -> np.ndarray:
    """Codes ``[n, k]`` and log tail mass ``[n]`` -> log-probs ``[n, k]`` that sum to ``1 − exp(rest)``."""
    u = -codes.astype(np.float64) * step
    m = u.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(u - m).sum(axis=1, keepdims=True))
    return (u - lse + _log1mexp(rest.astype(np.float64))[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- one shard


@dataclass
class Decoded:
    """A decoded shard: ``mask [rows, width]`` (stored positions), per stored position (row-major)
    ``codes [n, k]`` (quantised log-probs, :func:`dequantise` them; the float32 log-probs themselves in a ``values: f32`` store), ``ids [n, k]`` (ascending within a position) and
    ``rest [n]`` log tail mass; ``offsets [rows + 1]``: where each row's positions start."""

    mask: np.ndarray
    codes: np.ndarray
    ids: np.ndarray
    rest: np.ndarray
    offsets: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.mask, self.codes, self.ids, self.rest, self.offsets))


def encode_shard(mask: np.ndarray, top_logp: np.ndarray, ids: np.ndarray, rest: np.ndarray, step: float,
                 level: int = 9, values: str = "q8") -> bytes:
    """One shard: ``mask [rows, width]`` bool; per True position (row-major) ``top_logp [n, k]`` (descending),
    ``ids [n, k]`` and ``rest [n]`` (log tail mass). ``values``: ``q8`` (one byte per log-prob, module doc) or
    ``f32`` (log-probs and tail as float32). Returns the zstd-compressed bytes."""
    import zstandard

    mask = np.asarray(mask, dtype=bool)
    n, k = top_logp.shape
    if int(mask.sum()) != n or ids.shape != (n, k) or rest.shape != (n,):
        raise AttarError(f"teacher store: a shard's mask marks {int(mask.sum())} positions but {n} rows of top-{k} "
                         f"were given (ids {ids.shape}, rest {rest.shape}).")
    exact = values == "f32"
    codes = np.asarray(top_logp, dtype="<f4") if exact else quantise(np.asarray(top_logp, dtype=np.float64), step)
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, 1)
    scodes = np.take_along_axis(codes, order, 1)
    gaps = np.diff(sid, axis=1, prepend=-1) - 1
    if n and int(gaps.min()) < 0:
        raise AttarError("teacher store: a position lists the same id twice.")
    z = zstandard.ZstdCompressor(level=level)
    sections = [z.compress(x) for x in (np.packbits(mask.ravel()).tobytes(),
                                        np.asarray(rest, dtype=np.float32).astype("<f4" if exact else "<f2").tobytes(),
                                        np.ascontiguousarray(scodes).tobytes(), _varint_encode(gaps))]
    return _HEADER.pack(MAGIC, mask.shape[0], mask.shape[1], n, k, *map(len, sections)) + b"".join(sections)


def decode_shard(data: bytes, values: str = "q8") -> Decoded:
    """A shard's bytes -> :class:`Decoded`; ``values`` as it was encoded with (``f32``: ``codes`` holds the
    float32 log-probs themselves)."""
    import zstandard

    magic, rows, width, n, k, *lens = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a teacher-store shard")
    unz, p, parts = zstandard.ZstdDecompressor(), _HEADER.size, []
    for ln in lens:
        parts.append(unz.decompress(data[p : p + ln]))
        p += ln
    mask = np.unpackbits(np.frombuffer(parts[0], np.uint8), count=rows * width).astype(bool).reshape(rows, width)
    exact = values == "f32"
    rest = np.frombuffer(parts[1], "<f4" if exact else "<f2", n).astype(np.float32)
    codes = np.frombuffer(parts[2], "<f4" if exact else np.uint8, n * k).reshape(n, k)
    gaps = _varint_decode(parts[3], n * k).reshape(n, k)
    ids = (np.cumsum(gaps + 1, axis=1) - 1).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    return Decoded(mask, codes, ids, rest, offsets)


# ---------------------------------------------------------------------------------------------- writing


def _refuse(folder: Path, what: str) -> AttarError:
    return AttarError(f"teacher store {folder}: {what}. Delete the folder {folder} and dump the teacher again "
                      "(attar teacher dump), or point at an intact copy.")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.zst"


class StoreWriter:
    """Writes a store shard by shard; resumable: shards that a killed dump finished (listed in the manifest, with
    their size and sha256 intact) are kept, and :attr:`done` says which. ``write(i, ...)`` writes shard ``i``
    (rows ``i·shard_rows`` on) whole, then records it; ``finish()`` marks the store complete."""

    def __init__(self, folder: str | Path, settings: StoreSettings, overwrite: bool = False):
        self.folder = Path(folder)
        self.settings = settings
        found = read_manifest(self.folder) if self.folder.is_dir() else None
        if self.folder.is_dir() and any(self.folder.iterdir()) and found is None:
            raise AttarError(f"{self.folder} exists and is not a teacher store (no readable manifest.json); choose "
                             "another --out or empty the folder.")
        if found is not None and found.settings != settings and not overwrite:
            raise AttarError(f"{self.folder} holds a teacher store made with other settings "
                             f"({'; '.join(settings_diff(found.settings, settings))}); choose another --out, or pass "
                             "--overwrite to replace it.")
        self.folder.mkdir(parents=True, exist_ok=True)
        keep: list[ShardInfo] = []
        if found is not None and found.settings == settings:
            for s in found.shards:  # a shard whose file is gone or changed is written again
                f = self.folder / s.file
                if f.is_file() and f.stat().st_size == s.bytes and sha256_file(f) == s.sha256:
                    keep.append(s)
        self.manifest = Manifest(settings=settings, shards=keep, complete=bool(found and found.complete and
                                                                                found.settings == settings))
        self._save()

    @property
    def n_shards(self) -> int:
        return math.ceil(self.settings.rows / self.settings.shard_rows)

    @property
    def done(self) -> set[int]:
        return {int(s.file[6:11]) for s in self.manifest.shards}

    def shard_rows(self, i: int) -> tuple[int, int]:
        a = i * self.settings.shard_rows
        return a, min(a + self.settings.shard_rows, self.settings.rows)

    def write(self, i: int, mask: np.ndarray, top_logp: np.ndarray, ids: np.ndarray, rest: np.ndarray) -> ShardInfo:
        a, b = self.shard_rows(i)
        if mask.shape != (b - a, self.settings.width):
            raise AttarError(f"teacher store: shard {i} holds rows {a}..{b - 1}, got a mask of shape {mask.shape}.")
        data = encode_shard(mask, top_logp, ids, rest, self.settings.step, self.settings.zstd_level,
                            self.settings.values)
        atomic_write_bytes(self.folder / shard_name(i), data)
        info = ShardInfo(file=shard_name(i), rows=b - a, positions=int(np.asarray(mask).sum()), bytes=len(data),
                         sha256=hashlib.sha256(data).hexdigest())
        self.manifest.shards = sorted([s for s in self.manifest.shards if s.file != info.file] + [info],
                                      key=lambda s: s.file)
        self._save()
        return info

    def finish(self) -> Manifest:
        missing = sorted(set(range(self.n_shards)) - self.done)
        if missing:
            raise AttarError(f"teacher store {self.folder}: shards {missing[:8]} were never written.")
        self.manifest.complete = True
        self._save()
        return self.manifest

    def _save(self) -> None:
        atomic_write_json(self.folder / "manifest.json", self.manifest.model_dump())


# ---------------------------------------------------------------------------------------------- reading


class TeacherStore:
    """An opened, complete store (module doc). Rows are read through :meth:`positions` (stored positions only) or
    :meth:`dense` (``[rows, width, k]`` with filler at positions that were not stored)."""

    def __init__(self, folder: Path, manifest: Manifest, cache_bytes: int = 512 * 2**20):
        self.folder, self.manifest, self.cache_bytes = folder, manifest, cache_bytes
        self._cache: OrderedDict[int, Decoded] = OrderedDict()

    @property
    def settings(self) -> StoreSettings:
        return self.manifest.settings

    def __len__(self) -> int:
        return self.settings.rows

    @property
    def bytes(self) -> int:
        """Bytes of the shards on disk."""
        return self.manifest.bytes

    @property
    def bytes_per_position(self) -> float:
        return self.bytes / max(1, self.manifest.positions)

    @classmethod
    def open(cls, folder: str | Path, verify: bool = True, cache_bytes: int = 512 * 2**20) -> "TeacherStore":
        """Read the manifest, refuse an unfinished dump, and check every shard's size (and with ``verify`` its
        sha256) before anything is decoded."""
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise AttarError(f"teacher store {folder}: no such folder (make one with attar teacher dump).")
        m = read_manifest(folder)
        if m is None:
            raise _refuse(folder, "manifest.json is missing or is not a teacher-store manifest")
        if not m.complete:
            raise AttarError(f"teacher store {folder}: the dump did not finish ({len(m.shards)} of "
                             f"{math.ceil(m.settings.rows / m.settings.shard_rows)} shards written); run the same "
                             "attar teacher dump command again to resume it.")
        for s in m.shards:
            f = folder / s.file
            if not f.is_file():
                raise _refuse(folder, f"the shard {f.name} is missing")
            if f.stat().st_size != s.bytes:
                raise _refuse(folder, f"the shard {f.name} holds {f.stat().st_size} bytes, the manifest says {s.bytes}: "
                                      "it is truncated or changed")
            if verify and sha256_file(f) != s.sha256:
                raise _refuse(folder, f"the shard {f.name} does not have the sha256 the manifest records")
        return cls(folder, m, cache_bytes)

    def shard(self, i: int) -> Decoded:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        info = self.manifest.shards[i]
        f = self.folder / info.file
        data = f.read_bytes()
        if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            raise _refuse(self.folder, f"the shard {f.name} changed since the store was opened")
        try:
            d = decode_shard(data, self.settings.values)
        except Exception as e:  # a shard with the recorded hash that does not decode: a writer bug, say so
            raise _refuse(self.folder, f"the shard {f.name} does not decode ({e})") from None
        self._cache[i] = d
        while len(self._cache) > 1 and sum(x.nbytes for x in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return d

    def _check_rows(self, rows: np.ndarray) -> None:
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"teacher store rows must be in 0..{len(self) - 1}")

    def positions(self, rows: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(row, pos, values, ids, rest)`` for every stored position of ``rows`` (``row`` indexes into ``rows``)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        r_out, p_out, v_out, i_out, t_out = [], [], [], [], []
        per = self.settings.shard_rows
        for s in np.unique(rows // per):
            d = self.shard(int(s))
            sel = np.flatnonzero(rows // per == s)
            local = rows[sel] - s * per
            rr, pp = np.nonzero(d.mask[local])
            tok = d.offsets[local[rr]] + (np.arange(len(rr)) - np.concatenate([[0], np.cumsum(d.mask[local].sum(1))])[rr])
            r_out.append(sel[rr])
            p_out.append(pp)
            v_out.append(d.codes[tok].astype(np.float32) if self.settings.values == "f32"
                         else dequantise(d.codes[tok], d.rest[tok], self.settings.step))
            i_out.append(d.ids[tok])
            t_out.append(d.rest[tok])
        k = self.settings.k
        if not r_out:
            return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, k), np.float32),
                    np.zeros((0, k), np.int32), np.zeros(0, np.float32))
        return (np.concatenate(r_out), np.concatenate(p_out), np.concatenate(v_out), np.concatenate(i_out),
                np.concatenate(t_out))

    def dense(self, rows: Any, width: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``values [B, W, k]``, ``ids [B, W, k]``, ``rest [B, W]`` and ``stored [B, W]`` for ``rows`` over the first
        ``width`` positions; positions that were not stored hold a uniform filler over ids ``0..k-1``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        w = self.settings.width if width is None else int(width)
        k = self.settings.k
        values = np.full((len(rows), w, k), -math.log(k), dtype=np.float32)
        ids = np.broadcast_to(np.arange(k, dtype=np.int32), (len(rows), w, k)).copy()
        rest = np.full((len(rows), w), -1e4, dtype=np.float32)
        stored = np.zeros((len(rows), w), dtype=bool)
        r, p, v, i, t = self.positions(rows)
        keep = p < w
        r, p = r[keep], p[keep]
        values[r, p], ids[r, p], rest[r, p], stored[r, p] = v[keep], i[keep], t[keep], True
        return values, ids, rest, stored
