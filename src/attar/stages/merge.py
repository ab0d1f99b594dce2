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
        o = cls.parse_options("merge", st.options)
        if o.model_parameters is not None and len(o.model_parameters) != len(o.models):
            raise ValueError(f"merge.model_parameters has {len(o.model_parameters)} entries for {len(o.models)} models; give one per model")

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
        return next((c for c in counts.values() if c is not None), None)

    def run(self, pipe, st, ctx: StageContext) -> StageResult:
        from attar.merge.stage import merge_models
        from attar.models import save_model

        o = self.parse_options("merge", st.options)
        bundle = pipe.bundle(pipe.recipe.stage_data(st))
        models = [pipe.outputs[n].model for n in o.models]
        base = pipe.outputs[o.base].model if o.base else None
        model, info = merge_models(o.method, models, base=base, bundle=bundle, parameters=o.parameters,
                                   model_parameters=o.model_parameters, seed=pipe.recipe.stage_seed(st))
        spec = pipe.outputs[o.base or o.models[0]].spec  # all inputs share one architecture
        if dist.is_main():
            save_model(ctx.stage_dir / "model", model, spec, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std,
                       extra={"stage": st.name, "classes": bundle.classes, "merge": {"method": o.method, "models": o.models,
                                                                                      "base": o.base}})
        extra = {"merge": o.method, "inputs": ", ".join(o.models)}
        if "ingredients" in info:  # greedy soup: which inputs it kept
            extra["kept"] = ", ".join(o.models[i] for i in info["ingredients"])
        return StageResult(model, spec, extra=extra, artifacts={"model": ctx.stage_dir / "model"})
