"""The condensed-set artifact: a folder any later stage can read as ``DataSpec(artifact=...)``.

Layout (written by :func:`attar.checkpoint.write_checkpoint`, so the folder appears atomically
and every file is covered by ``manifest.json``)::

    synthetic.safetensors   x: float32 [N, C, H, W] in [0, 1] scale (learned images may leave [0, 1]),
                            y: int64 [N], and optionally soft: float32 [N, K] (logits of soft labels)
    state.json              kind "condensed" + metadata: method, ipc, seed, source data spec and hash,
                            architecture, method parameters, classes, input shape, timings
    manifest.json           sha256 of both files (written last)

An ``evaluation.json`` written next to them by :func:`attar.condense.evaluate_condensed` is a
record, not part of the artifact's contents, and is not hashed. The format lives in ``data`` because
``condense`` writes it and ``data`` reads it (``load_data(DataSpec(artifact=...))``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attar.checkpoint import MANIFEST, read_checkpoint, write_checkpoint
from attar.errors import AttarError

KIND = "condensed"
FORMAT = "attar-condensed/1"


@dataclass
class SyntheticSet:
    """A condensed data set in memory: images, hard labels, optional soft labels (logits) and metadata."""

    x: torch.Tensor
    y: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    soft: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() not in (2, 4):
            raise AttarError(f"SyntheticSet.x must be float32 [N, C, H, W] or [N, D], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise AttarError(f"SyntheticSet.y must be int64 [{self.x.shape[0]}], got {self.y.dtype} {tuple(self.y.shape)}")
        if self.soft is not None and (self.soft.dim() != 2 or self.soft.shape[0] != self.x.shape[0]):
            raise AttarError(f"SyntheticSet.soft must be [N, num_classes] with N = {self.x.shape[0]}, got {tuple(self.soft.shape)}")

    def __len__(self) -> int:
        return int(self.x.shape[0])


def data_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the training tensors a set was condensed from (shape, labels and every pixel)."""
    h = hashlib.sha256()
    h.update(f"{tuple(x.shape)}|{x.dtype}|{tuple(y.shape)}".encode())
    h.update(y.contiguous().numpy().tobytes())
    flat = x.detach().contiguous().view(-1)
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        h.update(flat[i : i + step].numpy().tobytes())
    return h.hexdigest()


def save_synthetic(folder: str | Path, s: SyntheticSet, overwrite: bool = False) -> Path:
    """Write ``s`` as a condensed-set artifact (atomic: the folder appears complete or not at all)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise AttarError(f"{folder} already exists and is not empty; choose another --out or pass overwrite.")
    tensors = {"x": s.x.detach().float().contiguous(), "y": s.y.detach().long().contiguous()}
    if s.soft is not None:
        tensors["soft"] = s.soft.detach().float().contiguous()
    state = {"kind": KIND, "format": FORMAT, **s.meta, "size": len(s), "soft_labels": s.soft is not None}
    return write_checkpoint(folder, {"synthetic": tensors}, state)


def is_condensed_artifact(folder: str | Path) -> bool:
    folder = Path(folder)
    if not (folder / MANIFEST).exists() or not (folder / "state.json").exists():
        return False
    import json

    try:
        return json.loads((folder / "state.json").read_text()).get("kind") == KIND
    except ValueError:
        return False


def load_synthetic(folder: str | Path) -> SyntheticSet:
    """Read and verify a folder written by :func:`save_synthetic` (hashes checked against the manifest)."""
    folder = Path(folder)
    if not folder.exists():
        raise AttarError(f"condensed set {folder} does not exist; give the folder written by `attar condense --out`.")
    tensors, state = read_checkpoint(folder)
    if state.get("kind") != KIND or "synthetic" not in tensors:
        raise AttarError(
            f"{folder} is an attar checkpoint of kind {state.get('kind')!r}, not a condensed data set "
            "(written by `attar condense`)."
        )
    t = tensors["synthetic"]
    meta = {k: v for k, v in state.items() if k not in ("kind", "format", "size", "soft_labels")}
    return SyntheticSet(x=t["x"], y=t["y"], meta=meta, soft=t.get("soft"))
