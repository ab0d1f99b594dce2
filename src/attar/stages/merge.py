"""``merge`` stage: merge earlier stages' models in memory with any registered merge method.

Recipe form::

    - name: soup
      kind: merge
      data: {name: fashion-mnist}          # held-out split for greedy_soup / wise_ft / lcsc, Fisher rows, test score
      merge: {method: ties, base: pre, models: [ft_a, ft_b], parameters: {density: 0.5}}
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from attar.stages.base import STAGES, StageContext, StageKind, StageResult
from attar.train import distributed as dist


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(..., description="a merge method (attar methods): linear, ties, dare_ties, slerp, greedy_soup, fisher, ...")
    models: list[str] = Field(..., min_length=1, description="earlier stages whose models are merged, in order")
    base: str | None = Field(None, description="earlier stage whose model is the base (task arithmetic, TIES, DARE, WiSE-FT)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's shared parameters")
    model_parameters: list[dict[str, Any] | None] | None = Field(None, description="per-model parameters, e.g. weight, density")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from attar.merge.methods import MERGE_METHODS

        if v not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(MERGE_METHODS.names())}")
        return v


@STAGES.register("merge")
class MergeStage(StageKind):
    Options = MergeOptions

    @classmethod
    def check(cls, st) -> None:
        from attar.errors import AttarError
        from attar.merge.config import check_numbers

        o = cls.parse_options("merge", st.options)
        if o.model_parameters is not None and len(o.model_parameters) != len(o.models):
            raise ValueError(f"merge.model_parameters has {len(o.model_parameters)} entries for {len(o.models)} models; give one per model")
        try:  # NaN, inf and out-of-range values are refused at load, not after the earlier stages trained
            check_numbers(o.method, "merge.parameters", o.parameters)
            for i, mp in enumerate(o.model_parameters or []):
                check_numbers(o.method, f"merge.model_parameters[{i}] ({o.models[i]})", mp)
        except AttarError as e:
            raise ValueError(str(e)) from None

    @classmethod
    def references(cls, st) -> list[str]:
        o = cls.parse_options("merge", st.options)
        return list(o.models) + ([o.base] if o.base else [])

    def preflight(self, pipe, st, index):
        o = self.parse_options("merge", st.options)
        counts = {n: pipe.stage_classes.get(n) for n in o.models + ([o.base] if o.base else [])}
        if len({c for c in counts.values() if c is not None}) > 1:
            raise pipe.error(st, f"the merged models predict different numbers of classes ({counts}); merge models of one task, "
                                 "or merge backbones with `attar merge` and keep each task's head.")
        self._check_shapes(pipe, st, ([o.base] if o.base else []) + list(o.models))
        return next((c for c in counts.values() if c is not None), None)

    @staticmethod
    def _built_by(pipe, name: str):
        """(stage that builds the model stage ``name`` outputs, its model spec), following init and merge inputs;
        (None, None) when that is not known before running (pretrained, artifacts, other kinds)."""
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            src = next((s for s in pipe.recipe.stages if s.name == name), None)
            if src is None:
                break
            if src.init:
                name = src.init
            elif src.model is not None:
                return (src, src.model) if src.model.arch else (None, None)
            elif src.kind == "merge":
                so = MergeStage.parse_options("merge", src.options)
                name = so.base or so.models[0]
            else:
                break
        return None, None

    def _check_shapes(self, pipe, st, names: list[str]) -> None:
        """Build each input's architecture on the meta device (no memory, no weights) and compare tensor shapes,
        so two stages of different widths fail before any run folder exists, naming the tensor and both shapes."""
        import torch

        from attar.errors import AttarError
        from attar.merge.validate import check_state_dicts
        from attar.models import build_model

        shapes: dict[str, dict] = {}
        for name in dict.fromkeys(names):
            src, spec = self._built_by(pipe, name)
            if spec is None:
                continue
            bundle = pipe.bundle(pipe.recipe.stage_data(src))
            try:
                with torch.random.fork_rng(devices=[]), torch.device("meta"):
                    model = build_model(spec, bundle.input_shape, len(bundle.classes))
            except Exception:  # noqa: BLE001 - an architecture that cannot build on meta is checked when the stage runs
                continue
            shapes[f"stage {name!r}"] = {k: v for k, v in model.state_dict().items()}
        if len(shapes) > 1:
            (ref_name, ref), *rest = shapes.items()
            try:
                check_state_dicts(ref, [sd for _, sd in rest], [n for n, _ in rest], ref_name)
            except AttarError as e:
                raise pipe.error(st, str(e)) from None

    def run(self, pipe, st, ctx: StageContext) -> StageResult:
        from attar.errors import AttarError
        from attar.merge.stage import merge_models
        from attar.models import save_model

        o = self.parse_options("merge", st.options)
        bundle = pipe.bundle(pipe.recipe.stage_data(st))
        models = [pipe.outputs[n].model for n in o.models]
        base = pipe.outputs[o.base].model if o.base else None
        try:
            model, info = merge_models(o.method, models, base=base, bundle=bundle, parameters=o.parameters,
                                       model_parameters=o.model_parameters, seed=pipe.recipe.stage_seed(st),
                                       labels=[f"stage {n!r}" for n in o.models], base_label=f"stage {o.base!r}")
        except AttarError as e:
            raise pipe.error(st, str(e)) from None
        spec = pipe.outputs[o.base or o.models[0]].spec  # all inputs share one architecture
        if dist.is_main():
            save_model(ctx.stage_dir / "model", model, spec, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std,
                       extra={"stage": st.name, "classes": bundle.classes, "merge": {"method": o.method, "models": o.models,
                                                                                      "base": o.base}})
        extra = {"merge": o.method, "inputs": ", ".join(o.models)}
        if "ingredients" in info:  # greedy soup: which inputs it kept
            extra["kept"] = ", ".join(o.models[i] for i in info["ingredients"])
        return StageResult(model, spec, extra=extra, artifacts={"model": ctx.stage_dir / "model"})
