"""The merge engine: validate every input, then stream tensor by tensor into the output.

Peak memory is about (number of inputs + 2) × the largest tensor in float32:
each step reads one tensor from every input (memory-mapped), merges it in
float32 whatever the storage dtype, casts it to the output dtype and appends it
to the shard being written. ``merge_state_dicts`` runs the same per-tensor code
on in-memory state dicts (tests, model-level methods, small PyTorch models).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import yaml

from attar.errors import AttarError
from attar.merge.config import MergeConfig, Setting, check_settings, layer_index, layer_position, load_merge_config, parse_dtype, resolve_parameters
from attar.merge.sources import open_source
from attar.merge.tensor_source import TensorSource
from attar.merge.writer import ShardWriter, parse_size
from attar.merge.methods import MergeMethod, TensorInputs, tensor_method
from attar.merge.validate import check_configs, check_finite, check_inputs, check_state_dicts
from attar.merge.vocab import (is_vocab_tensor, plan_vocab, resolve_chat_template, tokenizer_files_with_template,
                               vocab_rows)
from attar.train.progress import StepProgress

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEFAULT_SHARD_SIZE = "5GB"


@dataclass
class MergeResult:
    """What a merge produced; the pipeline records it as a model artifact."""

    out: Path
    method: str
    format: str
    tensors: int
    shards: int
    bytes: int
    seconds: float
    inputs: list[str]
    notes: list[str] = field(default_factory=list)


def _num_layers(src: TensorSource) -> int:
    cfg = src.config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    idx = [layer_index(n) for n in src.names()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def merge_tensor(
    method: MergeMethod,
    name: str,
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    model_settings: Sequence[Mapping[str, Setting] | None],
    global_settings: Mapping[str, Setting] | None,
    extras: Mapping[str, torch.Tensor] | None = None,
    t: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Merge one tensor in float32; returns float32 (the caller casts to the storage dtype)."""
    options, per_model = resolve_parameters(method, name, t, list(model_settings), dict(global_settings or {}))
    x = TensorInputs(
        name=name,
        base=None if base is None else base.float(),
        models=[m.float() for m in models],
        params=per_model,
        options=options,
        extras={k: v.float() for k, v in (extras or {}).items()},
        seed=seed,
    )
    out = method.fn(x)
    ref_shape = (base if base is not None else models[0]).shape
    if out.shape != ref_shape:
        raise RuntimeError(f"{method.name} returned shape {tuple(out.shape)} for {name}, expected {tuple(ref_shape)}")
    return out


def _method(name: str | MergeMethod) -> MergeMethod:
    return tensor_method(name)


def merge_state_dicts(
    method: str | MergeMethod,
    models: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None = None,
    *,
    parameters: Mapping[str, Setting] | None = None,
    model_parameters: Sequence[Mapping[str, Setting] | None] | None = None,
    extras: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    seed: int = 0,
    num_layers: int | None = None,
) -> dict[str, torch.Tensor]:
    """In-memory merge with exactly the semantics of the streaming engine.

    ``models`` are the non-base inputs (for ``linear`` the base, when given, is
    an input too, as in mergekit); ``parameters`` are the global settings and
    ``model_parameters[i]`` the settings of ``models[i]`` (same value forms as
    the YAML config). Non-float tensors are taken from the reference model.
    """
    m = _method(method)
    inputs = list(models)
    settings = list(model_parameters) if model_parameters is not None else [None] * len(inputs)
    if len(settings) != len(inputs):
        raise AttarError(f"got {len(settings)} model_parameters for {len(inputs)} models.")
    if m.base == "required" and base is None:
        raise AttarError(f"{m.name} needs a base model.")
    check_settings(m, "parameters", parameters, shared=True)
    for i, ms in enumerate(settings):
        check_settings(m, f"model_parameters[{i}]", ms, shared=False)
    if m.base_is_input and base is not None:
        inputs, settings = inputs + [base], settings + [None]
    ref = base if base is not None else inputs[0]
    check_state_dicts(ref, [sd for sd in inputs if sd is not ref],
                      [f"models[{i}]" for i, sd in enumerate(models) if sd is not ref],
                      "the base" if base is not None else "models[0]")
    for name, sd in (extras or {}).items():
        check_state_dicts(ref, [sd], [name], "the base" if base is not None else "models[0]")
    n_layers = num_layers
    if n_layers is None:
        idx = [i for i in (layer_index(k) for k in ref) if i is not None]
        n_layers = max(idx) + 1 if idx else 0
    out: dict[str, torch.Tensor] = {}
    for name, ref_t in ref.items():
        if not ref_t.is_floating_point():
            out[name] = ref_t.clone()
            continue
        merged = merge_tensor(
            m,
            name,
            None if (base is None or m.base_is_input) else base[name],
            [sd[name] for sd in inputs],
            model_settings=settings,
            global_settings=parameters,
            extras={k: sd[name] for k, sd in (extras or {}).items()},
            t=layer_position(name, n_layers),
            seed=seed,
        )
        stored = merged.to(ref_t.dtype)
        named = {f"models[{i}]": sd for i, sd in enumerate(models)} | ({"the base": base} if base is not None else {})
        check_finite(name, merged, stored, lambda: {k: sd[name] for k, sd in named.items()})
        out[name] = stored
    return out


@dataclass
class _Job:
    """One output tensor: where each input's tensor comes from, the settings that apply, and its depth ``t``."""

    name: str
    ref: tuple[TensorSource, str]
    base: tuple[TensorSource, str] | None
    inputs: list[tuple[TensorSource, str]]
    settings: list[Mapping[str, Setting] | None]
    glob: Mapping[str, Setting] | None
    t: float


_LAYER_NAME_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers)\.(\d+)(?:\.|$)")
_PRE_RE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings|embed_in")


def _layer_of(name: str) -> int | None:
    m = _LAYER_NAME_RE.search(name)
    return int(m.group(1)) if m else None


def _renumber(name: str, index: int) -> str:
    m = _LAYER_NAME_RE.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1):]


def _layers_key(src: TensorSource) -> str | None:
    cfg = src.config or {}
    return next((k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if isinstance(cfg.get(k), int)), None)


def _slice_jobs(cfg: MergeConfig, method: MergeMethod, get_source, notes: list[str]) -> tuple[list[_Job], TensorSource, int, list[TensorSource]]:
    """The jobs of a ``slices`` config (mergekit's layer plan): output layer k of slice s is layer r₀ + j of each of
    its sources, renumbered consecutively; tensors outside the layers come from the first slice's sources
    (embeddings) or the last slice's (final norm, head), at t = 0; inside a slice of L layers t = j/(L − 1)."""
    slices = cfg.layer_slices or []
    plans = []
    for i, sl in enumerate(slices):
        base_ref = sl.base_model or cfg.base_model
        sources = list(sl.sources)
        base_entry = None
        if base_ref is not None and not method.base_is_input:
            found = [s for s in sources if s.model == base_ref]
            if not found:
                raise AttarError(f"slices[{i}]: base_model {base_ref} is not one of the slice's sources; list it there "
                                 "with the same layer_range as the others (mergekit requires this too).")
            base_entry = found[0]
            sources = [s for s in sources if s.model != base_ref]
        if method.base == "required" and base_entry is None:
            raise AttarError(f"{method.name} needs `base_model` (slices[{i}] has none).")
        n = len(sources)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = f"exactly {method.min_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
            raise AttarError(f"slices[{i}]: {method.name} takes {want} source(s) per slice besides the base; got {n}.")
        glob = dict(cfg.parameters or {})
        glob.update(sl.parameters or {})
        plans.append((base_entry, sources, glob))
    first_base, first_sources, _ = plans[0]
    ref = get_source(cfg.base_model) if cfg.base_model else get_source((first_base or first_sources[0]).model)

    def entry(src_model: str, name: str) -> tuple[TensorSource, str]:
        src = get_source(src_model)
        if name not in src.names():
            raise AttarError(f"tensor {name!r} is missing from {src.label} (needed by the slices).")
        return src, name

    jobs: list[_Job] = []

    def add(out_name: str, base_entry, sources, glob, in_name, t: float) -> None:
        lead = base_entry or sources[0]
        r = entry(lead.model, in_name(lead))
        jobs.append(_Job(
            name=out_name, ref=r,
            base=entry(base_entry.model, in_name(base_entry)) if base_entry is not None else None,
            inputs=[entry(s.model, in_name(s)) for s in sources],
            settings=[s.parameters for s in sources], glob=glob, t=t,
        ))

    lead0 = get_source((first_base or first_sources[0]).model)
    outside = [n for n in lead0.names() if _layer_of(n) is None]
    for name in outside:
        if _PRE_RE.search(name):
            add(name, first_base, first_sources, plans[0][2], lambda s, name=name: name, 0.0)
    k = 0
    for base_entry, sources, glob in plans:
        lead = base_entry or sources[0]
        lead_src = get_source(lead.model)
        r0, r1 = lead.layer_range
        length = r1 - r0
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            names = [n for n in lead_src.names() if _layer_of(n) == r0 + j]
            if not names:
                raise AttarError(f"{lead_src.label} has no layer {r0 + j} (its layer_range is {[r0, r1]}).")
            for name in names:
                add(_renumber(name, k), base_entry, sources, glob,
                    lambda s, name=name, j=j: _renumber(name, s.layer_range[0] + j), t)
            k += 1
    last_base, last_sources, last_glob = plans[-1]
    for name in outside:
        if not _PRE_RE.search(name):
            add(name, last_base, last_sources, last_glob, lambda s, name=name: name, 0.0)
    used = list(dict.fromkeys(src for job in jobs for src, _ in ([job.ref] + job.inputs + ([job.base] if job.base else []))))
    check_configs(ref, [s for s in used if s is not ref])
    for job in jobs:
        shape = job.ref[0].shape(job.ref[1])
        for src, name in job.inputs + ([job.base] if job.base else []):
            if src.shape(name) != shape and not (cfg.vocab_source is not None and is_vocab_tensor(job.name)
                                                 and src.shape(name)[1:] == shape[1:]):
                raise AttarError(f"tensor {name!r} is {tuple(src.shape(name))} in {src.label} but {tuple(shape)} in "
                                 f"{job.ref[0].label} ({job.ref[1]}); the slices' layers must have the same shapes.")
    return jobs, ref, k, used


def run_merge(
    config: MergeConfig | str | Path | dict,
    out: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str | int | None = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
    base_dir: str | Path | None = None,
) -> MergeResult:
    """Run a merge config and write the result to ``out`` (atomically: all or nothing).

    ``dtype`` overrides the config's ``out_dtype``/``dtype``; without any, each
    tensor keeps the reference model's storage dtype. ``base_dir`` is where
    relative model paths are looked up first (default: the config file's folder).
    """
    start = time.perf_counter()
    if isinstance(config, (str, Path)):
        base_dir = base_dir or Path(config).resolve().parent
    cfg = config if isinstance(config, MergeConfig) else load_merge_config(config)
    method = _method(cfg.merge_method)
    base_dir = Path(base_dir) if base_dir else None
    notes = list(cfg.notes)
    out = Path(out)

    opened: dict[str, TensorSource] = {}

    def get_source(ref: str) -> TensorSource:
        if ref not in opened:
            opened[ref] = open_source(ref, base_dir=base_dir)
        return opened[ref]

    try:
        extras: dict[str, TensorSource] = {}
        out_layers = None
        use_slices = cfg.models is None
        if not use_slices and cfg.layer_range is not None:
            first = cfg.models[0].model
            use_slices = tuple(cfg.layer_range) != (0, _num_layers(get_source(first)))
        if use_slices:
            if method.model_refs and any((cfg.parameters or {}).get(r) for r in method.model_refs):
                raise AttarError(f"{method.name} with {', '.join(method.model_refs)} cannot be used with layer slices.")
            jobs, ref, out_layers, used = _slice_jobs(cfg, method, get_source, notes)
            base = get_source(cfg.base_model) if cfg.base_model else None
            all_inputs = used
            inputs_desc = [s.label for s in used]
        else:
            base = get_source(cfg.base_model) if cfg.base_model else None
            if method.base == "required" and base is None:
                raise AttarError(f"{method.name} needs `base_model` (the model the task vectors are taken from).")
            entries = list(cfg.models or [])
            if base is not None and not method.base_is_input:
                for e in entries:
                    if e.model == cfg.base_model and e.parameters:
                        notes.append(f"parameters given to the base model {e.model} are not used by {method.name}.")
                entries = [e for e in entries if e.model != cfg.base_model]
            inputs = [get_source(e.model) for e in entries]
            settings: list[Mapping[str, Setting] | None] = [e.parameters for e in entries]
            if method.base_is_input and base is not None and cfg.base_model not in [e.model for e in entries]:
                inputs.append(base)
                settings.append(None)
            n = len(inputs)
            if n < method.min_models or (method.max_models is not None and n > method.max_models):
                want = f"exactly {method.min_models}" if method.min_models == method.max_models else f"at least {method.min_models}"
                raise AttarError(f"{method.name} takes {want} model(s) besides the base; got {n}.")
            refs = {r: (cfg.parameters or {}).get(r) for r in method.model_refs}
            extras = {r: get_source(str(path)) for r, path in refs.items() if path is not None}
            merge_base = None if method.base_is_input else base
            all_inputs = ([merge_base] if merge_base is not None else []) + inputs + list(extras.values())
            ref = base if base is not None else inputs[0]
            others = [s for s in dict.fromkeys(inputs + list(extras.values())) if s is not ref]
            check_inputs(ref, others, vocab_aligned=cfg.vocab_source is not None)
            n_layers = _num_layers(ref)
            jobs = [
                _Job(name=name, ref=(ref, name), base=(merge_base, name) if merge_base is not None else None,
                     inputs=[(s, name) for s in inputs], settings=settings, glob=cfg.parameters,
                     t=layer_position(name, n_layers))
                for name in ref.names()
            ]
            inputs_desc = [s.label for s in ([base] if base is not None else []) + inputs]

        # The output vocabulary (tokenizer_source / tokenizer: {...}): every input aligned to it by token string.
        vocab = None
        srcs = list(dict.fromkeys(all_inputs))
        if cfg.vocab_source is not None:
            vocab = plan_vocab([s.label for s in srcs], [s.root for s in srcs], cfg.vocab_source,
                               base=srcs.index(base) if base in srcs else None, pad=cfg.pad_to_multiple_of, base_dir=base_dir,
                               tokens=cfg.tokenizer.tokens if cfg.tokenizer else None, rows=[vocab_rows(s) for s in srcs])
            if vocab is None:
                notes.append("tokenizer_source/tokenizer has nothing to act on: no input has a tokenizer.json.")
            else:
                notes.append(vocab.describe())

        def is_vocab_job(job: _Job) -> bool:
            return vocab is not None and is_vocab_tensor(job.name) and job.ref[0].dtype(job.ref[1]).is_floating_point

        def job_shape(job: _Job) -> tuple[int, ...]:
            shape = tuple(job.ref[0].shape(job.ref[1]))
            return (vocab.rows,) + shape[1:] if is_vocab_job(job) else shape

        def job_tensors(job: _Job) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, torch.Tensor]]:
            """The job's base, input and extra tensors; vocabulary tensors re-indexed to the output vocabulary."""
            entries = ([job.base] if job.base is not None else []) + job.inputs + [(s, job.ref[1]) for s in extras.values()]
            if is_vocab_job(job):
                got = dict(zip(dict.fromkeys(entries), vocab.align([(srcs.index(s), s.get(n)) for s, n in dict.fromkeys(entries)])))
            else:
                got = {e: e[0].get(e[1]) for e in dict.fromkeys(entries)}
            return (got[job.base] if job.base is not None else None, [got[e] for e in job.inputs],
                    {k: got[(s, job.ref[1])] for k, s in extras.items()})

        out_name = parse_dtype(dtype, "--dtype") or cfg.out_dtype or cfg.dtype
        out_dtype = TORCH_DTYPES[out_name] if out_name else None

        _check_out_not_input(out, list(opened.values()))
        plan = []
        for job in jobs:
            d = job.ref[0].dtype(job.ref[1])
            plan.append((job.name, job_shape(job), out_dtype if (out_dtype is not None and d.is_floating_point) else d))
        fmt = ref.format if ref.format in ("hf", "attar") else "safetensors"
        writer = ShardWriter(out, plan, fmt=fmt, max_shard_bytes=parse_size(shard_size), overwrite=overwrite)
        with writer:
            with StepProgress(f"{method.name} merge", len(plan), enabled=False if progress is False else None,
                              unit="tensors") as bar:
                for job, (name, _shape, target) in zip(jobs, plan):
                    src, src_name = job.ref
                    if not src.dtype(src_name).is_floating_point:
                        writer.write(name, src.get(src_name))
                    else:
                        base_t, input_ts, extra_ts = job_tensors(job)
                        merged = merge_tensor(
                            method,
                            name,
                            base_t,
                            input_ts,
                            model_settings=job.settings,
                            global_settings=job.glob,
                            extras=extra_ts,
                            t=job.t,
                            seed=cfg.seed,
                        )
                        stored = merged.to(target)
                        check_finite(name, merged, stored,
                                     lambda job=job: {s.label: s.get(n) for s, n in dict.fromkeys(job.inputs + ([job.base] if job.base else []))})
                        writer.write(name, stored)
                    bar.update()
            extra_files: dict[str, bytes | None] = {}
            if vocab is not None and fmt == "hf":
                extra_files.update(vocab.tokenizer_files())
            if cfg.chat_template is not None:
                template = resolve_chat_template(cfg.chat_template, [s.root for s in srcs])
                if template is None:
                    notes.append("chat_template: auto found no chat template in the inputs; the reference's tokenizer files are kept.")
                elif fmt == "hf" and ref.root is not None and (ref.root / "tokenizer_config.json").is_file():
                    extra_files.update(tokenizer_files_with_template(ref.root, template, extra_files.get("tokenizer_config.json")))
                else:
                    notes.append("chat_template is not written: the reference model has no tokenizer_config.json to copy.")
            record = {
                "method": method.name,
                "inputs": inputs_desc,
                "config": cfg.model_dump(mode="json", exclude_none=True),
                "notes": notes,
            }
            config_json = None
            if fmt == "hf" and ref.config is not None:
                config_json = dict(ref.config)
                if out_name:
                    for key in ("dtype", "torch_dtype"):
                        if key in config_json:
                            config_json[key] = out_name
                if out_layers is not None and _layers_key(ref):
                    config_json[_layers_key(ref)] = out_layers
                if vocab is not None:
                    for key in ("vocab_size", "n_vocab", "padded_vocab_size"):
                        if isinstance(config_json.get(key), int):
                            config_json[key] = vocab.rows
                            break
            state = None
            if fmt == "attar":
                state = dict(ref.state or {})
                state["merge"] = record
            else:
                extra_files["attar_merge.yaml"] = yaml.safe_dump(record, sort_keys=False).encode()
            writer.commit(copy_from=ref.root, config=config_json, state=state, extra_files=extra_files)
        return MergeResult(
            out=out,
            method=method.name,
            format=fmt,
            tensors=len(plan),
            shards=len(writer.shards),
            bytes=writer.total_bytes,
            seconds=time.perf_counter() - start,
            inputs=inputs_desc,
            notes=notes,
        )
    finally:
        for s in opened.values():
            s.close()


def _check_out_not_input(out: Path, sources: Sequence[TensorSource]) -> None:
    o = out.resolve()
    for s in sources:
        for p in {s.path, getattr(getattr(s, "base", None), "path", s.path)}:
            p = Path(p).resolve()
            if o == p or o in p.parents:
                raise AttarError(f"output {out} is (or contains) the input {p}; write the merge somewhere else.")
