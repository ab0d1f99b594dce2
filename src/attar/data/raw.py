"""What a source hands to ``load_data``: compact numpy arrays before any split or float conversion.

Sources keep pixels as uint8 (with a ``divisor``) so splitting copies bytes, not floats,
and the in-process caches stay small.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

# Hash source files only when they are small enough that hashing costs well under a second.
HASH_LIMIT_BYTES = 256 * 1024 * 1024


@dataclass
class Raw:
    """Decoded source: ``x`` [N, C, H, W] (images) or [N, D] (tables), ``y`` int labels (-1 = unlabeled).

    ``x_test`` is ``None`` when the source has no official test split; ``load_data`` then carves one.
    ``x`` is divided by ``divisor`` after the float32 conversion (255 for uint8 pixels), which gives
    exactly the values ``pixels / 255`` that a pretrained teacher's own preprocessing expects.
    """

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    divisor: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, cached on (path, size, mtime) so repeated loads do not re-read it."""
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> dict[str, str] | None:
    """{relative name: sha256} for small sources; ``None`` (not hashed) when they exceed ``HASH_LIMIT_BYTES``."""
    paths = list(paths)
    if sum(os.path.getsize(p) for p in paths) > HASH_LIMIT_BYTES:
        return None
    out = {}
    for p in paths:
        name = str(Path(p).relative_to(root)) if root is not None else Path(p).name
        out[name] = sha256_file(p)
    return out


def sha256_tree(paths: Iterable[Path], root: Path) -> str | None:
    """One digest over many files (names and contents), for image folders with thousands of files."""
    paths = sorted(paths)
    if sum(os.path.getsize(p) for p in paths) > HASH_LIMIT_BYTES:
        return None
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).relative_to(root)).encode())
        h.update(b"\0")
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def readonly(a: np.ndarray) -> np.ndarray:
    """Freeze arrays held by in-process caches so no caller can corrupt later loads."""
    a.setflags(write=False)
    return a
