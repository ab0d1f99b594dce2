"""``condense`` stage: distil the stage's data into a few synthetic images per class.

The synthetic set is written to ``<run>/<stage>/data`` and later stages train on it with
``data: {stage: <this stage>}`` (its validation and test rows are the source data's)::

    - name: syn
      kind: condense
      data: {name: fashion-mnist}
      condense: {method: dm, ipc: 10, iterations: 200}
    - name: on_syn
      kind: train
      data: {stage: syn}
      model: {arch: convnet, width: 32, depth: 3}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from attar.condense import check_request, condense, evaluate_condensed
from attar.condense.schedule import plan_schedule
from attar.data.artifact import is_condensed_artifact
from attar.specs import ModelSpec
from attar.stages.base import STAGES, StageContext, StageInputs, StageKind, StageResult


class CondenseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(..., description="random, herding, kcenter, dm, datadam, dc, dsa, ... (attar methods condense)")
    ipc: int = Field(..., ge=1, description="synthetic images per class")
    iterations: int | None = Field(None, ge=1, description="outer iterations (default: see budget)")
    budget: str | float | None = Field(None, description="wall-time budget of a learned method, e.g. 10m, 90s, 1h30m or "
                                                        "seconds; with no iterations on a CPU: 5m (a CPU budget)")
    paper_schedule: bool = Field(False, description="the paper's iteration count (hours on a CPU)")
    init: Literal["real", "noise"] = "real"
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own fields")
    model: ModelSpec | None = Field(None, description="the network matched through (default ConvNet width 128 depth 3)")
    soft_labels: str | None = Field(None, description="an earlier stage whose model labels the synthetic images (soft labels)")
    evaluate: int = Field(0, ge=0, description="nets trained by the evaluation protocol after condensing (0: skip)")


@STAGES.register("condense")
class CondenseStage(StageKind):
    Options = CondenseOptions
    writes_data = True

    @classmethod
    def references(cls, st) -> list[str]:
        o = cls.parse_options("condense", st.options)
        return [o.soft_labels] if o.soft_labels else []

    def preflight(self, inputs: StageInputs):
        o, bundle = inputs.options, inputs.data
        with inputs.context():
            cls = check_request(o.method, o.ipc, bundle.train.y, bundle.classes, bundle.name, o.params, o.init)
            plan_schedule(cls.learns_images, cls.default_iterations, o.iterations, o.budget, o.paper_schedule)
        return len(bundle.classes)

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        o = inputs.options
        out = ctx.stage_dir / "data"
        if ctx.resume and is_condensed_artifact(out):
            inputs.log(f"  finished earlier: {out}")
        else:
            soft = str(ctx.run_dir / o.soft_labels / "model") if o.soft_labels else None
            condense(inputs.data_spec, o.method, o.ipc, out, o.iterations, inputs.seed, model=o.model, init=o.init,
                     params=o.params, soft_labels=soft, overwrite=True, budget=o.budget,
                     paper_schedule=o.paper_schedule, log=inputs.log)
        metrics: dict[str, Any] = {"images": o.ipc * len(inputs.data.classes), "ipc": o.ipc, "method": o.method}
        if o.evaluate:
            r = evaluate_condensed(out, nets=o.evaluate, seed=inputs.seed, full_data=False,
                                   cache_dir=inputs.cache_dir, log=inputs.log)
            metrics["accuracy"] = r["condensed"]["mean"]
            metrics["accuracy_std"] = r["condensed"]["std"]
            metrics["random_subset_accuracy"] = r["random_subset"]["mean"]
        return StageResult(None, {}, metrics=metrics, data=out, artifacts={"data": out})
