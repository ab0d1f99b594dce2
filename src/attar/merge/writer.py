"""The streaming safetensors writer: output shards written as tensors arrive, renamed into place at the end.

:class:`ShardWriter` knows every output tensor's name, shape and dtype before
the first one is computed (the engine validates inputs first), so it writes
each safetensors header up front and then appends tensor bytes as they arrive:
peak memory is one tensor, not one shard. Everything goes to a hidden temp
folder that is renamed into place only after the last file is written; a
failed merge removes it, so no partial output folder is ever left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from attar.checkpoint import MANIFEST
from attar.io import commit_folder, make_temp_dir
from attar.errors import AttarError
from attar.merge.tensor_source import ST_DTYPES

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
COPIED_FILES = ("config.json", "generation_config.json") + TOKENIZER_FILES


def parse_size(value: str | int | None) -> int | None:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (decimal units, as transformers uses)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(value).upper())
    if not m:
        raise AttarError(f"shard size {value!r} is not a size; write e.g. 5GB, 500MB or a number of bytes.")
    unit = m.group(2) or "B"
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
    if scale is None:
        raise AttarError(f"shard size {value!r}: unknown unit {unit}.")
    return int(float(m.group(1)) * scale)



@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class _Shard:
    filename: str
    entries: list[_Planned] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class ShardWriter:
    """Writes planned tensors, in plan order, straight into safetensors shards inside a temp folder.

    ``fmt``: ``"hf"`` (shards + index when more than one, config and tokenizer
    copied, loadable by transformers), ``"attar"`` (one ``model.safetensors`` +
    ``state.json`` + ``manifest.json`` with hashes, as checkpoint.write_checkpoint
    writes) or ``"safetensors"`` (shards + index, nothing copied). Use as a
    context manager: leaving it with an exception deletes the temp folder.
    """

    def __init__(
        self,
        out: str | Path,
        plan: list[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        fmt: str,
        max_shard_bytes: int | None = None,
        overwrite: bool = False,
    ):
        self.out = Path(out)
        self.fmt = fmt
        self.overwrite = overwrite
        for parent in self.out.parents:  # the nearest existing ancestor must be a folder, or mkdir fails
            if parent.exists():
                if not parent.is_dir():
                    raise AttarError(f"output {self.out}: {parent} is a file, not a folder, so nothing can be written "
                                     "under it; choose another --out.")
                break
        if self.out.exists() and not overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
            raise AttarError(f"output {self.out} already exists and is not empty; choose another folder or pass --overwrite.")
        if fmt == "attar":
            max_shard_bytes = None  # an artifact is one model.safetensors (what load_model_artifact reads)
        planned = [_Planned(n, tuple(s), d, _nbytes(tuple(s), d)) for n, s, d in plan]
        shards: list[_Shard] = []
        for p in planned:
            if not shards or (max_shard_bytes and shards[-1].entries and shards[-1].nbytes + p.nbytes > max_shard_bytes):
                shards.append(_Shard(""))
            shards[-1].entries.append(p)
        if not shards:
            shards.append(_Shard(""))
        for i, sh in enumerate(shards):
            sh.filename = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        self.shards = shards
        self._order = [(p, i) for i, sh in enumerate(shards) for p in sh.entries]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._file_shard = -1
        self._hash: Any = None
        self.hashes: dict[str, str] = {}
        self.tmp: Path | None = None

    def __enter__(self) -> "ShardWriter":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = make_temp_dir(self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp")  # becomes --out: umask mode
        except OSError as e:
            raise AttarError(f"cannot write the output {self.out}: {e.strerror or e} ({e.filename or self.out.parent}); "
                             "choose an --out in a folder you can write to.") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._close_file()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def total_bytes(self) -> int:
        return sum(sh.nbytes for sh in self.shards)

    def _start_shard(self, index: int) -> None:
        self._close_file()
        sh = self.shards[index]
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in sh.entries:
            header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        assert self.tmp is not None
        self._file = open(self.tmp / sh.filename, "wb")
        self._hash = hashlib.sha256()
        self._file_shard = index
        self._write(struct.pack("<Q", len(raw)) + raw)

    def _write(self, data: Any) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.hashes[self.shards[self._file_shard].filename] = self._hash.hexdigest()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (must come in plan order, with the planned shape and dtype)."""
        if self._pos >= len(self._order):
            raise RuntimeError(f"ShardWriter: unexpected extra tensor {name!r}")
        p, shard = self._order[self._pos]
        if name != p.name or tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise RuntimeError(
                f"ShardWriter: expected {p.name} {p.shape} {p.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._file_shard:
            self._start_shard(shard)
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._write(memoryview(t.view(torch.uint8).numpy()))
        self._pos += 1

    def commit(
        self,
        *,
        copy_from: Path | None = None,
        config: dict[str, Any] | None = None,
        state: dict[str, Any] | None = None,
        extra_files: dict[str, bytes | None] | None = None,
    ) -> Path:
        """Finish files, write index/config (hf) or state + manifest (attar), then rename into place."""
        if self._pos != len(self._order):
            raise RuntimeError(f"ShardWriter: {len(self._order) - self._pos} planned tensors were never written")
        if not self._order:
            self._start_shard(0)
        self._close_file()
        assert self.tmp is not None
        tmp = self.tmp
        if self.fmt in ("hf", "safetensors") and len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {e.name: sh.filename for sh in self.shards for e in sh.entries},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if self.fmt == "hf" and copy_from is not None:
            for fname in COPIED_FILES:
                src = copy_from / fname
                if src.is_file() and fname != "config.json":
                    shutil.copy2(src, tmp / fname)
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for fname, data in (extra_files or {}).items():
            if data is None:  # a copied file the output must not carry (e.g. a tokenizer file that no longer agrees)
                (tmp / fname).unlink(missing_ok=True)
                continue
            (tmp / fname).write_bytes(data)
            self.hashes[fname] = hashlib.sha256(data).hexdigest()
        if self.fmt == "attar":
            state_bytes = json.dumps(state or {}, indent=2, sort_keys=True, default=str).encode()
            (tmp / "state.json").write_bytes(state_bytes)
            files = {"model.safetensors": self.hashes["model.safetensors"], "state.json": hashlib.sha256(state_bytes).hexdigest()}
            (tmp / MANIFEST).write_text(json.dumps({"format": "attar-checkpoint/1", "files": files}, indent=2, sort_keys=True))
        commit_folder(tmp, self.out)
        self.tmp = None
        return self.out

