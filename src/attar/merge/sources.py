"""Which merge input a path is: a Hugging Face folder, an attar model artifact, a ``.safetensors`` file or a
PEFT LoRA adapter (merged into its base on the fly, see :mod:`attar.merge.lora_source`).

Pickled weights are refused (unpickling can run code); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from attar.checkpoint import MANIFEST, looks_pickled, sha256_file
from attar.errors import AttarError
from attar.merge.lora_source import LoraSource
from attar.merge.tensor_source import SafetensorsSource, TensorSource, read_json, single_file


def _open_hf(folder: Path, label: str) -> SafetensorsSource:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AttarError(f"{index} has no weight_map; the model folder is damaged.")
        src = SafetensorsSource(folder, label, {k: folder / v for k, v in weight_map.items()}, order=list(weight_map))
    else:
        src = single_file(folder / "model.safetensors", label)
        src.path = folder
    src.kind = "hf"
    src.root = folder
    if (folder / "config.json").exists():
        src.config = read_json(folder / "config.json")
    return src


def _open_attar(folder: Path, label: str) -> SafetensorsSource:
    manifest = read_json(folder / MANIFEST)
    state = read_json(folder / "state.json")
    files = manifest.get("files", {})
    if state.get("kind") != "model" or "model.safetensors" not in files:
        raise AttarError(f"{folder} is an attar checkpoint but not a model artifact (kind={state.get('kind')!r}).")
    digest = sha256_file(folder / "model.safetensors")
    if digest != files["model.safetensors"]:
        raise AttarError(
            f"{folder}/model.safetensors does not match its manifest (sha256 {digest[:12]}…): "
            "the artifact was modified or only partly written."
        )
    src = single_file(folder / "model.safetensors", label)
    src.path = folder
    src.kind = "attar"
    src.root = folder
    src.state = state
    return src


def open_source(ref: str | Path, *, label: str | None = None, base_dir: Path | None = None) -> TensorSource:
    """Open a merge input by path (``BASE+ADAPTER`` merges a LoRA adapter into BASE, as in mergekit).

    Relative paths are looked up next to ``base_dir`` (the config's folder) first,
    then in the working directory.
    """
    label = label or str(ref)
    path = _resolve(str(ref), base_dir)
    if path is None and "+" in str(ref):
        base_ref, adapter_ref = str(ref).rsplit("+", 1)
        base = open_source(base_ref, label=base_ref, base_dir=base_dir)
        adapter = _resolve(adapter_ref, base_dir)
        if adapter is None:
            raise AttarError(f"LoRA adapter {adapter_ref!r} (in {label!r}) does not exist.")
        return LoraSource(adapter, label, base)
    if path is None:
        raise AttarError(
            f"model {label!r} does not exist here. attar reads local folders and files only "
            "(a Hugging Face folder, an attar model artifact, a .safetensors file or a LoRA adapter folder); "
            "download hub models first, e.g. `huggingface-cli download ORG/NAME --local-dir DIR`."
        )
    if path.is_file():
        if path.suffix == ".safetensors":
            return single_file(path, label)
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt") or looks_pickled(path):
            raise AttarError(
                f"{path} is a pickled PyTorch file; attar never unpickles (it can run arbitrary code). "
                "Convert it once, from a source you trust, with `attar convert-checkpoint`."
            )
        raise AttarError(f"{path} is not a .safetensors file.")
    if (path / "adapter_config.json").exists():
        cfg = read_json(path / "adapter_config.json")
        base_ref = cfg.get("base_model_name_or_path")
        base_path = _resolve(base_ref, path) if base_ref else None
        if base_path is None:
            raise AttarError(
                f"LoRA adapter {label!r}: its base ({base_ref!r}) is not a local folder. "
                f"Name the base explicitly as BASE+ADAPTER, e.g. `model: ./base+{label}`."
            )
        return LoraSource(path, label, open_source(base_path, label=str(base_ref)))
    if (path / MANIFEST).exists() and (path / "state.json").exists():
        return _open_attar(path, label)
    if (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists():
        return _open_hf(path, label)
    if any((path / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise AttarError(
            f"{path} holds pickled weights (pytorch_model.bin) only. attar never unpickles; re-save it with "
            "`model.save_pretrained(DIR, safe_serialization=True)` from a source you trust."
        )
    raise AttarError(
        f"{path} is not a model attar can read: no model.safetensors, model.safetensors.index.json, "
        "adapter_config.json or attar manifest.json in it."
    )


def _resolve(ref: str, base_dir: Path | None) -> Path | None:
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir else []) + [p]
    for c in candidates:
        if c.exists():
            return c
    return None
