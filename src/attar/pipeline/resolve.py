"""Turning a recipe stage into the :class:`~attar.stages.StageInputs` its kind works on.

Why a separate resolver: stage kinds should not reach into the pipeline (or each other) for their data, models,
teachers and options. The resolver owns the caches that make that cheap (data bundles loaded once, teacher
specs built once, teacher outputs computed once per weights and data) and the earlier stages' outputs.
During preflight it hands out untrained stand-ins, so every check that needs an architecture runs before any
run folder exists.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from attar.data import load_data
from attar.distill.lm_config import LMStageOptions
from attar.distill.cls_store import stage_teacher_store
from attar.distill.objectives import build_objective
from attar.distill.teacher_cache import TeacherCache
from attar.errors import AttarError, error_context
from attar.models import build_model, load_model
from attar.recipe import Recipe, StageSpec
from attar.select import build_selector
from attar.specs import DataSpec, ModelSpec, TeacherStoreRef
from attar.stages import STAGES, EarlierStage, StageInputs
from attar.train import distributed as dist
from attar.train.config import TrainConfig


class Resolver:
    def __init__(self, recipe: Recipe, cache_dir: Path, log: Callable[..., None]):
        self.recipe = recipe
        self.cache_dir = cache_dir
        self.log = log
        self.earlier: dict[str, EarlierStage] = {}  # filled as stages run (or preflight)
        self._bundles: dict[str, object] = {}
        self._teacher_models: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ data
    def resolve_data(self, spec: DataSpec) -> DataSpec:
        """``{stage: X}`` -> the data set stage X wrote; before X has run (preflight), X's own source data,
        which has the same shape and classes. Recipes only refer to earlier stages, so the chain ends."""
        while spec.stage:
            out = self.earlier.get(spec.stage)
            if out is not None and out.data is not None:
                return DataSpec(artifact=str(out.data))
            src = self.stage(spec.stage)
            if not src.kind_spec().writes_data:
                writers = ", ".join(k for k in STAGES if STAGES.get(k).writes_data)
                raise AttarError(f"data {{stage: {spec.stage}}}: stage {spec.stage!r} ({src.kind}) writes no data set; "
                                 f"only {writers} stages do.")
            spec = self.recipe.stage_data(src)
        return spec

    def bundle(self, spec: DataSpec):
        spec = self.resolve_data(spec)
        key = spec.model_dump_json()
        if key not in self._bundles:
            self._bundles[key] = load_data(spec)
        return self._bundles[key]

    def data_of(self, name: str):
        """The data stage ``name`` read: its DataBundle, or for a causal-LM stage ``(text spec, seed)`` (the
        reader tokenises it with its own tokenizer and splits it with that seed, as the stage did)."""
        st = self.stage(name)
        o = getattr(st, "options", None)
        if isinstance(o, LMStageOptions):  # the seed the stage split its text with (attar.stages.lm._settings)
            return o.data, o.train.seed if "seed" in o.train.model_fields_set else self.recipe.stage_seed(st)
        return self.bundle(self.recipe.stage_data(st))

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.recipe.stages if s.name == name)

    # ------------------------------------------------------------------ models
    def model_from_spec(self, spec: ModelSpec, bundle) -> nn.Module:
        if spec.artifact:
            model, info = load_model(spec.artifact)
            shape = tuple(info.get("input_shape") or ())
            if shape and shape != tuple(bundle.input_shape):
                raise AttarError(
                    f"model artifact {spec.artifact} takes inputs of shape {shape}, but this stage's data "
                    f"({bundle.name}) has shape {tuple(bundle.input_shape)}. Use data of the shape it was trained on."
                )
            return model
        return build_model(spec, bundle.input_shape, len(bundle.classes), mean=bundle.mean, std=bundle.std)

    def teacher_model(self, ref: ModelSpec, bundle) -> nn.Module:
        """A teacher given as a model spec, built once for the whole run."""
        key = ref.model_dump_json()
        if key not in self._teacher_models:
            with torch.random.fork_rng(devices=[]):
                self._teacher_models[key] = self.model_from_spec(ref, bundle)
        return self._teacher_models[key]

    def _student(self, st: StageSpec, index: int, bundle, preflight: bool) -> tuple[nn.Module | None, dict]:
        if st.init:
            src = self.earlier[st.init]
            return (copy.deepcopy(src.model) if src.model is not None else None), src.spec
        if st.model is None:
            return None, {}
        spec = st.model.model_dump(exclude_none=True)
        if preflight:
            if st.model.hf:
                return None, spec
            with torch.random.fork_rng(devices=[]), error_context(f"stage {st.name!r} (stages[{index}].model)"):
                return self.model_from_spec(st.model, bundle), spec  # the run builds the real one from its seed
        torch.manual_seed(self.recipe.stage_seed(st))  # the student's initial weights depend on the seed only
        return self.model_from_spec(st.model, bundle), spec

    # ------------------------------------------------------------------ methods
    @staticmethod
    def objective(st: StageSpec, index: int):
        spec = st.objective or {"name": "kd" if st.kind == "distill" else "ce"}
        with error_context(f"stage {st.name!r} (stages[{index}].objective)"):
            obj = build_objective(spec)
        if obj.needs_teacher and not st.teachers():
            raise AttarError(
                f"stage {st.name!r}: objective {spec['name']!r} needs a teacher; add `teacher:` "
                "(an earlier stage name or a model spec) or use kind: train with objective ce."
            )
        return obj

    @staticmethod
    def selector(st: StageSpec, index: int):
        with error_context(f"stage {st.name!r} (stages[{index}].selector)"):
            return build_selector(st.selector)

    def teacher_cache(self, objective, teachers: list[nn.Module], x: torch.Tensor, cfg: TrainConfig):
        """The teachers' log-probabilities on ``x``, computed once per (weights, data) and kept in ``cache_dir``
        across stages and runs; None when the objective needs the teacher live (features, augmented views)."""
        if not objective.needs_teacher or objective.needs_live_teacher or cfg.teacher_cache == "off":
            return None
        if cfg.teacher_cache == "auto" and cfg.augment:
            return None  # the teacher must see the student's augmented view: run it live

        h = hashlib.sha256()
        for t in teachers:
            for k, v in sorted(t.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        h.update(x.numpy().tobytes()[:: max(1, x.numel() // 100_000)])
        h.update(f"{x.shape}{cfg.cache_topk}".encode())
        path = self.cache_dir / f"teacher-{h.hexdigest()[:20]}.safetensors"
        if path.exists():
            self.log(f"  teacher outputs: reusing cache {path}")
            return TeacherCache.load(path)
        self.log(f"  teacher outputs: computing once for {len(x)} rows (cached at {path})")
        cache = TeacherCache.build(teachers, x, k=cfg.cache_topk)
        if dist.is_main():
            cache.save(path)
        return cache

    # ------------------------------------------------------------------ the one entry point
    def resolve(self, st: StageSpec, index: int, preflight: bool = False) -> StageInputs:
        """Everything stage ``st`` works on. With ``preflight`` the models are untrained stand-ins and no
        teacher pass runs; otherwise they are the real ones (earlier stages have run)."""
        kind = st.kind_spec()
        inputs = StageInputs(name=st.name, kind=st.kind, index=index, seed=self.recipe.stage_seed(st), spec=st,
                             options=kind.parse_options(st.kind, st.options), earlier=self.earlier,
                             cache_dir=self.cache_dir, log=self.log, preflight=preflight)
        inputs.data_of = self.data_of
        if kind.needs_data:
            data = self.recipe.stage_data(st)
            inputs.data = self.bundle(data)
            inputs.data_spec = self.resolve_data(data)
            inputs.classes = len(inputs.data.classes)
            inputs.model, inputs.model_spec = self._student(st, index, inputs.data, preflight)
            inputs.teachers = [self.earlier[r].model if isinstance(r, str) else self.teacher_model(r, inputs.data)
                               for r in st.teachers() if not isinstance(r, TeacherStoreRef)]
        if kind.trains:
            inputs.train = st.train
            inputs.objective = self.objective(st, index)
            inputs.selector = self.selector(st, index)
            stores = [r for r in st.teachers() if isinstance(r, TeacherStoreRef)]
            if stores:  # teacher: {store: DIR}: the stored outputs are the teacher cache, checked against the rows
                later = preflight and self.recipe.stage_data(st).stage  # data an earlier stage writes: checked at run
                opened = stage_teacher_store(st, stores, inputs.objective, st.train, inputs.data.classes,
                                             None if later else inputs.data.train.x)
                inputs.teacher_cache = lambda: opened
            elif not preflight:
                x = inputs.data.train.x
                objective, teachers, cfg = inputs.objective, inputs.teachers, st.train
                inputs.teacher_cache = lambda: self.teacher_cache(objective, teachers, x, cfg)
        return inputs
