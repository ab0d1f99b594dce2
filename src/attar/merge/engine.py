"""The merge engine: validate every input, then stream tensor by tensor into the output.

Peak memory is about (number of inputs + 2) × the largest tensor in float32:
each step reads one tensor from every input (memory-mapped), merges it in
float32 whatever the storage dtype, casts it to the output dtype and appends it
to the shard being written. ``merge_state_dicts`` runs the same per-tensor code
on in-memory state dicts (tests, model-level methods, small PyTorch models).
"""

from __future__ import annotations

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
from attar.merge.validate import check_finite, check_inputs, check_state_dicts
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
        refs = {ref: (cfg.parameters or {}).get(ref) for ref in method.model_refs}
        extras = {ref: get_source(str(path)) for ref, path in refs.items() if path is not None}
        merge_base = None if method.base_is_input else base
        all_inputs = ([merge_base] if merge_base is not None else []) + inputs + list(extras.values())
        ref = base if base is not None else inputs[0]
        others = [s for s in dict.fromkeys(inputs + list(extras.values())) if s is not ref]
        check_inputs(ref, others)

        n_layers = _num_layers(ref)
        if cfg.layer_range is not None and tuple(cfg.layer_range) != (0, n_layers):
            raise AttarError(
                f"slice layer_range {list(cfg.layer_range)} does not cover the whole model ({n_layers} layers); "
                "partial slices (frankenmerges) are not supported yet."
            )
        out_name = parse_dtype(dtype, "--dtype") or cfg.out_dtype or cfg.dtype
        out_dtype = TORCH_DTYPES[out_name] if out_name else None

        _check_out_not_input(out, list(opened.values()))
        names = ref.names()
        plan = []
        for name in names:
            d = ref.dtype(name)
            plan.append((name, ref.shape(name), out_dtype if (out_dtype is not None and d.is_floating_point) else d))
        fmt = ref.format if ref.format in ("hf", "attar") else "safetensors"
        inputs_desc = [s.label for s in ([base] if base is not None else []) + inputs]
        writer = ShardWriter(out, plan, fmt=fmt, max_shard_bytes=parse_size(shard_size), overwrite=overwrite)
        with writer:
            with StepProgress(f"{method.name} merge", len(plan), enabled=False if progress is False else None,
                              unit="tensors") as bar:
                for name, _shape, target in plan:
                    if not ref.dtype(name).is_floating_point:
                        writer.write(name, ref.get(name))
                    else:
                        merged = merge_tensor(
                            method,
                            name,
                            merge_base.get(name) if merge_base is not None else None,
                            [s.get(name) for s in inputs],
                            model_settings=settings,
                            global_settings=cfg.parameters,
                            extras={k: s.get(name) for k, s in extras.items()},
                            t=layer_position(name, n_layers),
                            seed=cfg.seed,
                        )
                        stored = merged.to(target)
                        check_finite(name, merged, stored, lambda: {s.label: s.get(name) for s in dict.fromkeys(all_inputs)})
                        writer.write(name, stored)
                    bar.update()
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
            state = None
            extra_files: dict[str, bytes] = {}
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
