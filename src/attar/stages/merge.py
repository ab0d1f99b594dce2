"""``merge`` stage: merge earlier stages' models in memory with any registered merge method.

Recipe form::

    - name: soup
      kind: merge
      data: {name: fashion-mnist}          # held-out split for greedy_soup / wise_ft / lcsc, Fisher rows, test score
      merge: {method: ties, base: pre, models: [ft_a, ft_b], parameters: {density: 0.5}}

RegMean's Grams and AdaMerging's unlabeled inputs come from each merged model's own data (the data its stage
read; ``merge.data: stage`` uses this stage's data for all). Every merge reports, per source model, the
merged model's accuracy on that model's test split and its **forgetting** there: the source model's own
accuracy minus the merged model's (columns ``accuracy[ft_a]``, ``forgetting[ft_a]``, mean ``forgetting``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from attar.errors import AttarError
from attar.merge.config import check_settings as check_numbers
from attar.merge.methods import MERGE_METHODS
from attar.merge.stage import merge_models
from attar.merge.validate import check_state_dicts
from attar.metrics import classification_metrics
from attar.models import save_model
from attar.stages.base import STAGES, StageContext, StageInputs, StageKind, StageResult
from attar.train import distributed as dist
from attar.train.trainer import predict


class MergeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(..., description="a merge method (attar methods): linear, ties, dare_ties, slerp, greedy_soup, fisher, ...")
    models: list[str] = Field(..., min_length=1, description="earlier stages whose models are merged, in order")
    base: str | None = Field(None, description="earlier stage whose model is the base (task arithmetic, TIES, DARE, WiSE-FT)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's shared parameters")
    model_parameters: list[dict[str, Any] | None] | None = Field(None, description="per-model parameters, e.g. weight, density")
    data: Literal["own", "stage"] = Field("own", description="rows of RegMean's Grams and AdaMerging's inputs: own (each "
                                                              "model's stage data) or stage (this stage's data for all)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(MERGE_METHODS.names())}")
        return v


def check_merge_numbers(o: Any) -> None:
    """A merge block's ``parameters`` and per-model ``model_parameters``, checked at recipe load: NaN, inf and
    out-of-range values are refused then, not after the earlier stages trained (a ValueError naming the field)."""
    try:
        check_numbers(o.method, "merge.parameters", o.parameters)
        for i, mp in enumerate(o.model_parameters or []):
            check_numbers(o.method, f"merge.model_parameters[{i}] ({o.models[i]})", mp)
    except AttarError as e:
        raise ValueError(str(e)) from None


@STAGES.register("merge")
class MergeStage(StageKind):
    Options = MergeOptions

    @classmethod
    def check(cls, st) -> None:
        o = cls.parse_options("merge", st.options)
        if o.model_parameters is not None and len(o.model_parameters) != len(o.models):
            raise ValueError(f"merge.model_parameters has {len(o.model_parameters)} entries for {len(o.models)} models; give one per model")
        check_merge_numbers(o)

    @classmethod
    def references(cls, st) -> list[str]:
        o = cls.parse_options("merge", st.options)
        return list(o.models) + ([o.base] if o.base else [])

    @classmethod
    def produces_model_like(cls, st) -> str | None:
        o = cls.parse_options("merge", st.options)
        return o.base or o.models[0]

    def preflight(self, inputs: StageInputs):
        o = inputs.options
        names = ([o.base] if o.base else []) + list(o.models)
        counts = {n: inputs.earlier[n].classes for n in names}
        if len({c for c in counts.values() if c is not None}) > 1:
            raise inputs.error(f"the merged models predict different numbers of classes ({counts}); merge models of "
                               "one task, or merge backbones with `attar merge` and keep each task's head.")
        self._check_shapes(inputs, names)
        return next((c for c in counts.values() if c is not None), None)

    @staticmethod
    def _check_shapes(inputs: StageInputs, names: list[str]) -> None:
        """Compare the tensor shapes of the inputs' untrained stand-ins, so two stages of different widths fail
        before any run folder exists, naming the tensor and both shapes."""
        shapes = {f"stage {n!r}": inputs.earlier[n].model.state_dict() for n in dict.fromkeys(names)
                  if inputs.earlier[n].model is not None}
        if len(shapes) > 1:
            (ref_name, ref), *rest = shapes.items()
            with inputs.context():
                check_state_dicts(ref, [sd for _, sd in rest], [n for n, _ in rest], ref_name)

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        o, bundle = inputs.options, inputs.data
        models = [inputs.earlier[n].model for n in o.models]
        base = inputs.earlier[o.base].model if o.base else None
        own = [inputs.data_of(n) if inputs.data_of else bundle for n in o.models]
        with inputs.context():
            model, info = merge_models(o.method, models, base=base, bundle=bundle, parameters=o.parameters,
                                       model_parameters=o.model_parameters, seed=inputs.seed,
                                       labels=[f"stage {n!r}" for n in o.models], base_label=f"stage {o.base!r}",
                                       data=own if o.data == "own" else None)
        spec = inputs.earlier[o.base or o.models[0]].spec  # all inputs share one architecture
        if dist.is_main():
            save_model(ctx.stage_dir / "model", model, spec, bundle.input_shape, len(bundle.classes), bundle.mean, bundle.std,
                       extra={"stage": inputs.name, "classes": bundle.classes,
                              "merge": {"method": o.method, "models": o.models, "base": o.base}})
        extra = {"merge": o.method, "inputs": ", ".join(o.models)}
        if "ingredients" in info:  # greedy soup: which inputs it kept
            extra["kept"] = ", ".join(o.models[i] for i in info["ingredients"])
        if "lambdas" in info:  # AdaMerging: the learned coefficients (task-wise) or their mean per model
            lam = [sum(v) / len(v) if isinstance(v, list) else v for v in info["lambdas"]]
            extra["lambda"] = ", ".join(f"{n}={v:.3f}" for n, v in zip(o.models, lam))
            inputs.log(f"  adamerging entropy {info['entropy'][0]:.4f} -> {info['entropy'][-1]:.4f}; λ {extra['lambda']}")
        extra.update(forgetting(model, dict(zip(o.models, models)), dict(zip(o.models, own))))
        return StageResult(model, spec, extra=extra, artifacts={"model": ctx.stage_dir / "model"})


def _accuracy(model, split) -> float | None:
    keep = split.y >= 0
    if int(keep.sum()) == 0:
        return None
    return float(classification_metrics(predict(model, split.x[keep]), split.y[keep])["accuracy"])


def forgetting(merged, sources: dict[str, Any], data: dict[str, Any]) -> dict[str, float]:
    """Per source: the merged model's test accuracy on that source's data (``accuracy[name]``) and the drop from the
    source's own accuracy there (``forgetting[name]``, positive = forgotten), plus the mean drop (``forgetting``)."""
    acc: dict[str, float] = {}
    drop: dict[str, float] = {}
    merged_acc: dict[int, float | None] = {}
    for name, src in sources.items():
        b = data[name]
        if id(b) not in merged_acc:
            merged_acc[id(b)] = _accuracy(merged, b.test)
        mine, theirs = merged_acc[id(b)], _accuracy(src, b.test)
        if mine is not None and theirs is not None:
            acc[f"accuracy[{name}]"], drop[f"forgetting[{name}]"] = mine, theirs - mine
    mean = {"forgetting": sum(drop.values()) / len(drop)} if drop else {}
    return {**acc, **drop, **mean}
