"""Streaming tensor I/O for merges: lazy, memory-mapped inputs and a shard writer that never holds a model.

Inputs (:func:`open_source`) are opened with ``safetensors.safe_open``: only the
headers are read up front, and :meth:`TensorSource.get` reads one tensor when
the engine asks for it. Four kinds are recognised:

* Hugging Face folders: ``model.safetensors`` or shards + ``model.safetensors.index.json``;
* attar model artifacts: ``model.safetensors`` + ``state.json`` + ``manifest.json`` (hash verified);
* a plain ``.safetensors`` file;
* PEFT LoRA adapter folders, merged into their base on the fly (W += (alpha/r)·B@A).

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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from attar.checkpoint import MANIFEST, _fsync_dir, looks_pickled, sha256_file
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


# ---------------------------------------------------------------- inputs




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


def _single_file(path: Path, label: str) -> SafetensorsSource:
    with open_safetensors(path) as h:
        keys = list(h.keys())
    return SafetensorsSource(path, label, {k: path for k in keys}, order=keys)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AttarError(f"{path} is not readable JSON ({e}).") from None


def _open_hf(folder: Path, label: str) -> SafetensorsSource:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AttarError(f"{index} has no weight_map; the model folder is damaged.")
        src = SafetensorsSource(folder, label, {k: folder / v for k, v in weight_map.items()}, order=list(weight_map))
    else:
        src = _single_file(folder / "model.safetensors", label)
        src.path = folder
    src.kind = "hf"
    src.root = folder
    if (folder / "config.json").exists():
        src.config = _read_json(folder / "config.json")
    return src


def _open_attar(folder: Path, label: str) -> SafetensorsSource:
    manifest = _read_json(folder / MANIFEST)
    state = _read_json(folder / "state.json")
    files = manifest.get("files", {})
    if state.get("kind") != "model" or "model.safetensors" not in files:
        raise AttarError(f"{folder} is an attar checkpoint but not a model artifact (kind={state.get('kind')!r}).")
    digest = sha256_file(folder / "model.safetensors")
    if digest != files["model.safetensors"]:
        raise AttarError(
            f"{folder}/model.safetensors does not match its manifest (sha256 {digest[:12]}…): "
            "the artifact was modified or only partly written."
        )
    src = _single_file(folder / "model.safetensors", label)
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
            return _single_file(path, label)
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt") or looks_pickled(path):
            raise AttarError(
                f"{path} is a pickled PyTorch file; attar never unpickles (it can run arbitrary code). "
                "Convert it once, from a source you trust, with `attar convert-checkpoint`."
            )
        raise AttarError(f"{path} is not a .safetensors file.")
    if (path / "adapter_config.json").exists():
        cfg = _read_json(path / "adapter_config.json")
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


# ---------------------------------------------------------------- LoRA


@dataclass
class _LoraDelta:
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    kind: str  # "linear" or "embedding"


class LoraSource(TensorSource):
    """A base model with a PEFT LoRA adapter merged in, tensor by tensor.

    Matches PEFT's ``merge_and_unload``: ΔW = scale·B@A, transposed for
    ``fan_in_fan_out`` layers (GPT-2's Conv1D) and for embeddings; scale is
    alpha/r (alpha/√r with rsLoRA), alpha from ``alpha_pattern`` when it names
    the module. Other tensors in the adapter (``modules_to_save``, trained
    biases, and the ``X.base_layer.weight`` copies PEFT saves of targeted
    embeddings and heads) replace the base's, and a LoRA update is added on top,
    as PEFT does. Adapters whose initialisation moved the base weights (PiSSA,
    OLoRA, CorDA, LoftQ, LoRA-GA) are refused until converted. The adapter file
    is small, so it is read whole.
    """

    kind = "lora"

    def __init__(self, adapter_dir: Path, label: str, base: TensorSource):
        super().__init__(adapter_dir, label)
        self.base = base
        self.config, self.state, self.root = base.config, base.state, base.root
        cfg = _read_json(adapter_dir / "adapter_config.json")
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise AttarError(f"{label}: adapter type {cfg.get('peft_type')!r} is not LoRA; only LoRA adapters can be merged.")
        if cfg.get("use_dora"):
            raise AttarError(f"{label}: DoRA adapters are not supported yet; merge it with PEFT's merge_and_unload first.")
        from attar.adapt.peft_format import check_plain_init, check_saved_modules

        check_plain_init(cfg, label)
        weights = adapter_dir / "adapter_model.safetensors"
        if not weights.exists():
            if (adapter_dir / "adapter_model.bin").exists():
                raise AttarError(f"{label}: adapter_model.bin is pickled; attar reads adapter_model.safetensors only.")
            raise AttarError(f"{label}: {weights} is missing.")
        with open_safetensors(weights) as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
        check_saved_modules(cfg, list(tensors), base.names(), label)
        alpha = float(cfg.get("lora_alpha", 8))
        alpha_pattern: dict[str, float] = cfg.get("alpha_pattern") or {}
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        rslora = bool(cfg.get("use_rslora", False))
        base_names = base.names()
        name_set = set(base_names)
        # Whole tensors the adapter carries (modules_to_save, e.g. a classifier head): when the base lacks
        # them, say so instead of guessing that the adapter belongs to another model.
        to_save = [re.escape(m) for m in cfg.get("modules_to_save") or []]
        saved = {re.sub(r"\.modules_to_save\.[^.]+\.", ".", k.removeprefix("base_model.model."))
                 for k in tensors if to_save and re.search(rf"(^|\.)({'|'.join(to_save)})\.", k)}
        absent: list[str] = []

        def to_base(key: str) -> str:
            if key in name_set:
                return key
            hits = [n for n in base_names if n.endswith("." + key) or key.endswith("." + n)]
            if not hits and key in saved:
                absent.append(key)
                return key
            if len(hits) != 1:
                raise AttarError(
                    f"{label}: adapter tensor for {key!r} matches {len(hits)} tensors of the base "
                    f"{base.label} ({hits[:3]}); is this adapter for that base model?"
                )
            return hits[0]

        self._deltas: dict[str, _LoraDelta] = {}
        self._replace: dict[str, torch.Tensor] = {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            k = key.removeprefix("base_model.model.")
            m = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight|(.+)\.lora_embedding_(A|B)(?:\.[^.]+)?", k)
            if m:
                module = m.group(1) or m.group(3)
                part = m.group(2) or m.group(4)
                kind = "linear" if m.group(1) else "embedding"
                pairs.setdefault(module, {"kind": kind})[part] = t
            elif "lora_magnitude_vector" in k:
                raise AttarError(f"{label}: DoRA adapters are not supported yet.")
            elif re.search(r"\.lora_[A-Za-z_]+", k):
                raise AttarError(f"{label}: adapter tensor {key!r} is of a LoRA variant attar cannot merge yet.")
            else:
                k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k).replace(".base_layer.", ".")
                self._replace[to_base(k)] = t
        if absent:
            raise AttarError(_missing_head_message(label, adapter_dir, base.label, absent, cfg))
        for module, p in pairs.items():
            if "A" not in p or "B" not in p:
                raise AttarError(f"{label}: module {module!r} has only one of lora_A / lora_B.")
            a, b = p["A"].float(), p["B"].float()
            r = a.shape[0]
            mod_alpha = alpha
            for pattern, value in alpha_pattern.items():
                if re.fullmatch(rf"(.*\.)?{pattern}", module):
                    mod_alpha = float(value)
                    break
            scale = mod_alpha / (r ** 0.5 if rslora else r)
            target = to_base(f"{module}.weight")
            d = _LoraDelta(a, b, scale, p["kind"])
            shape = self._delta(d, fan_in_fan_out).shape
            if tuple(shape) != base.shape(target):
                raise AttarError(
                    f"{label}: LoRA update for {target!r} has shape {tuple(shape)} but the base {base.label} has "
                    f"{base.shape(target)}; check fan_in_fan_out and that the adapter belongs to this base."
                )
            self._deltas[target] = d
        self._fan_in_fan_out = fan_in_fan_out
        for name, t in self._replace.items():
            if tuple(t.shape) != base.shape(name):
                raise AttarError(f"{label}: adapter tensor {name!r} has shape {tuple(t.shape)}, the base {base.shape(name)}.")

    @staticmethod
    def _delta(d: _LoraDelta, fan_in_fan_out: bool) -> torch.Tensor:
        if d.kind == "embedding":
            return (d.b @ d.a).T * d.scale
        if d.a.dim() > 2:  # convolution: A is a conv kernel, B a 1x1 conv
            out = torch.einsum("or,r...->o...", d.b.flatten(1), d.a)
        else:
            out = d.b @ d.a
        return (out.T if fan_in_fan_out else out) * d.scale

    @property
    def format(self) -> str:
        return self.base.format

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        dtype = self.base.dtype(name)
        t = self._replace[name] if name in self._replace else self.base.get(name)
        d = self._deltas.get(name)
        if d is None:
            return t.to(dtype)
        return (t.float() + self._delta(d, self._fan_in_fan_out)).to(dtype)

    def close(self) -> None:
        self.base.close()


def _missing_head_message(label: str, adapter_dir: Path, base_label: str, absent: list[str], cfg: dict[str, Any]) -> str:
    """The adapter carries whole modules (``modules_to_save``, usually a new classification head) its base lacks."""
    modules = sorted({n.rsplit(".", 1)[0] for n in absent})
    model_dir = adapter_dir.parent / "model"
    if (adapter_dir.parent / "metrics.json").is_file() and (model_dir / "config.json").is_file():
        fix = (f"This is an attar fine-tune's adapter: its merged model, head included, is {model_dir}; use that folder "
               f"as the merge input instead.")
    else:
        fix = (f"Build the full model first, e.g. `attar finetune apply-peft {base_label} {adapter_dir} --out DIR` "
               "(or PEFT's merge_and_unload on the base loaded with its task head, saved with save_pretrained), "
               "and use DIR as the merge input.")
    return (
        f"{label}: the adapter carries {', '.join(repr(m) for m in modules)} (modules_to_save "
        f"{cfg.get('modules_to_save')}, tensors {absent[:4]}), which its base {base_label} does not have: the base is "
        f"the bare model and that module (usually the classification head) was created during fine-tuning, so it "
        f"has no place to go and the merge would lose it. {fix}"
    )


# ---------------------------------------------------------------- output


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
        from attar.checkpoint import make_temp_dir

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
        extra_files: dict[str, bytes] | None = None,
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
            (tmp / fname).write_bytes(data)
            self.hashes[fname] = hashlib.sha256(data).hexdigest()
        if self.fmt == "attar":
            state_bytes = json.dumps(state or {}, indent=2, sort_keys=True, default=str).encode()
            (tmp / "state.json").write_bytes(state_bytes)
            files = {"model.safetensors": self.hashes["model.safetensors"], "state.json": hashlib.sha256(state_bytes).hexdigest()}
            (tmp / MANIFEST).write_text(json.dumps({"format": "attar-checkpoint/1", "files": files}, indent=2, sort_keys=True))
        _fsync_dir(tmp)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".old", dir=self.out.parent))
            os.replace(self.out, trash / "old")
            os.replace(tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, self.out)
        _fsync_dir(self.out.parent)
        self.tmp = None
        return self.out
