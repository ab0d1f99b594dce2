"""What a merge input is: tensor names, shapes and dtypes known up front, tensors read one at a time.

Inputs are opened with ``safetensors.safe_open``: only the headers are read up front, and
:meth:`TensorSource.get` reads (memory-maps) one tensor when the engine asks for it, so a merge never
holds a model. Which kind of source a path is, is decided in :mod:`attar.merge.sources`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from attar.checkpoint import looks_pickled
from attar.errors import AttarError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    ST_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    ST_DTYPES["F8_E5M2"] = torch.float8_e5m2
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class TensorSource:
    """One merge input: tensor names, shapes and dtypes known up front, tensors read on demand."""

    kind: str = "safetensors"  # "hf", "attar", "safetensors" or "lora"

    def __init__(self, path: Path, label: str):
        self.path = Path(path)
        self.label = label
        self.config: dict[str, Any] | None = None  # Hugging Face config.json, when there is one
        self.state: dict[str, Any] | None = None  # attar state.json, when there is one
        self.root: Path | None = None  # folder whose config/tokenizer files an output copies

    @property
    def format(self) -> str:
        """Output format an output based on this input should have."""
        return self.kind

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"


class SafetensorsSource(TensorSource):
    """Tensors spread over one or more safetensors files, each opened memory-mapped once."""

    def __init__(self, path: Path, label: str, files: dict[str, Path], order: list[str] | None = None):
        super().__init__(path, label)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        wanted = set(files.values())
        for f in sorted(wanted, key=str):
            h = self._open(f)
            for name in h.keys():
                sl = h.get_slice(name)
                dt = sl.get_dtype()
                if dt not in ST_DTYPES:
                    raise AttarError(f"{f}: tensor {name!r} has dtype {dt}, which attar cannot merge.")
                self._meta[name] = (tuple(sl.get_shape()), ST_DTYPES[dt])
        for name, f in files.items():
            if name not in self._meta:
                raise AttarError(f"{label}: the index says tensor {name!r} is in {f.name}, but it is not there.")
            self._file_of[name] = f
        self._names = order if order is not None else list(files)

    def _open(self, f: Path):
        if f not in self._handles:
            if not f.exists():
                raise AttarError(f"{self.label}: file {f} is missing.")
            self._handles[f] = open_safetensors(f)
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _pickle_like(path: Path) -> bool:
    """A torch.save zip or a pickle of any protocol: 2-5 start with PROTO (0x80), 0-1 end with STOP ('.')."""
    if looks_pickled(path):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"."
    except OSError:
        return False


def open_safetensors(path: Path):
    """``safe_open`` a file, or one paragraph saying why it cannot be read (pickled, truncated, not safetensors).

    The header is parsed by safetensors (Rust), so nothing in the file is ever executed; the checks
    here only choose the words of the error.
    """
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if _pickle_like(path):
            raise AttarError(
                f"{path} is a pickled PyTorch file (torch.save / pickle), not safetensors, whatever its name says; "
                "attar never unpickles (it can run arbitrary code). Convert it once, from a source you trust, with "
                "`attar convert-checkpoint FILE OUT.safetensors`."
            ) from None
        raise AttarError(
            f"{path} is not a readable safetensors file ({e}); it is probably truncated (an interrupted download or "
            "copy) or not a safetensors file at all. Download or copy it again."
        ) from None


def single_file(path: Path, label: str) -> SafetensorsSource:
    with open_safetensors(path) as h:
        keys = list(h.keys())
    return SafetensorsSource(path, label, {k: path for k in keys}, order=keys)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AttarError(f"{path} is not readable JSON ({e}).") from None
