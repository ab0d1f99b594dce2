"""Atomic safetensors checkpoints with a manifest of hashes.

Why: a run killed at any instant must leave either the previous good checkpoint
or the new one, never a torn file; and loading must never unpickle anything.
Every file is written to a temp name, fsynced, then renamed; a checkpoint folder
counts only once its ``manifest.json`` (written last) exists and its hashes match.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from attar.errors import AttarError
from attar.io import (  # noqa: F401  (re-exported: checkpoint writers are io writers)
    _fsync_dir,
    apply_umask,
    atomic_write_bytes,
    atomic_write_json,
    make_temp_dir,
    make_temp_file,
    sha256_file,
    staged_folder,
)

MANIFEST = "manifest.json"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Save tensors atomically as safetensors; returns the file's sha256.

    Tensors that share memory (tied input and output embeddings) are written once each: safetensors refuses
    aliases, and loading the copies back into a tied model restores the one shared tensor."""
    clean, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        seen.add(ptr)
        clean[k] = v
    data = save(clean, metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def looks_pickled(path: Path) -> bool:
    """True for torch.save zips and raw pickles, never for a safetensors file.

    A safetensors file starts with its header length (u64, little endian) and then ``{``;
    that length's low byte can be 0x80, the pickle protocol marker, so the header is checked first.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_safetensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing pickles and reporting truncation or hash mismatch clearly."""
    path = Path(path)
    if not path.exists():
        raise AttarError(f"Checkpoint file {path} does not exist.")
    if looks_pickled(path):
        raise AttarError(
            f"{path} is a pickled PyTorch file, not safetensors. attar never unpickles files by default because "
            "unpickling can run arbitrary code. Convert it once, from a source you trust, with "
            "`attar convert-checkpoint FILE OUT.safetensors` (it uses torch.load(weights_only=True))."
        )
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise AttarError(
                f"{path} does not match its manifest (sha256 {actual[:12]}… expected {expected_sha256[:12]}…): "
                "the file was modified or only partly written. Resume from an earlier checkpoint or retrain."
            )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AttarError(
            f"{path} is not a readable safetensors file ({e}); it is probably truncated. "
            "Use an earlier checkpoint or retrain."
        ) from None


# ---------------------------------------------------------------- checkpoint folders


def write_checkpoint(folder: str | Path, tensor_files: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> Path:
    """Write ``{name}.safetensors`` files plus ``state.json``, then the manifest (last, atomically).

    The folder is first assembled under a temporary name and renamed into place,
    so a crash mid-write leaves only a ``.tmp`` folder that readers ignore.
    """
    folder = Path(folder)
    with staged_folder(folder) as tmp:
        files: dict[str, str] = {}
        for name, tensors in tensor_files.items():
            files[f"{name}.safetensors"] = atomic_save_safetensors(tensors, tmp / f"{name}.safetensors")
        state_bytes = json.dumps(state, indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(tmp / "state.json", state_bytes)
        files["state.json"] = hashlib.sha256(state_bytes).hexdigest()
        atomic_write_json(tmp / MANIFEST, {"format": "attar-checkpoint/1", "files": files})
    return folder


def read_checkpoint(folder: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read and verify a folder written by :func:`write_checkpoint`."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise AttarError(f"{folder} has no {MANIFEST}: it is not a complete attar checkpoint.")
    manifest = json.loads(manifest_path.read_text())
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, Any] = {}
    for fname, digest in manifest["files"].items():
        path = folder / fname
        if fname.endswith(".safetensors"):
            tensors[fname[: -len(".safetensors")]] = load_safetensors(path, digest)
        else:
            if not path.exists() or sha256_file(path) != digest:
                raise AttarError(f"{path} is missing or does not match its manifest hash; the checkpoint is damaged.")
            state = json.loads(path.read_text())
    return tensors, state


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete ``step-*`` folder under ``root`` (incomplete ``.tmp`` folders are ignored)."""
    root = Path(root)
    if not root.exists():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).exists())
    return done[-1] if done else None


# ---------------------------------------------------------------- model artifacts


def save_model_artifact(folder: str | Path, model: torch.nn.Module, info: dict[str, Any]) -> Path:
    """A model artifact: ``model.safetensors`` + ``model.json`` (how to rebuild it) + manifest.

    ``info`` must hold ``spec`` (a ModelSpec dict), ``input_shape`` and ``num_classes``.
    """
    state = {k: v for k, v in model.state_dict().items()}
    # safetensors refuses shared storage; clone to break aliasing (e.g. tied weights).
    state = {k: v.detach().clone() for k, v in state.items()}
    return write_checkpoint(folder, {"model": state}, {"kind": "model", **info})


def load_model_artifact(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, info = read_checkpoint(folder)
    if info.get("kind") != "model" or "model" not in tensors:
        raise AttarError(f"{folder} is a checkpoint but not a model artifact (kind={info.get('kind')!r}).")
    return tensors["model"], info
