"""``train`` and ``distill`` stages: the one trainer on an image/table data set; ``evaluate``: score a model."""

from __future__ import annotations

import copy
import json

from attar.checkpoint import atomic_write_json
from attar.data import make_augment
from attar.errors import AttarError
from attar.models import load_model, save_model
from attar.paths import remove_tree
from attar.select.base import check_selector
from attar.stages.base import STAGES, StageContext, StageInputs, StageKind, StageResult
from attar.train import distributed as dist
from attar.train.growth import g_stack
from attar.train.trainer import Trainer


@STAGES.register("train")
class TrainStage(StageKind):
    """Train a model (``model`` spec or ``init`` stage) with an objective (default ``ce``)."""

    trains = True

    @classmethod
    def check(cls, st) -> None:
        if st.model is None and st.init is None:
            raise ValueError(f"stage {st.name!r} needs a 'model' spec or an 'init' stage to start from")

    @classmethod
    def references(cls, st) -> list[str]:
        growth = getattr(getattr(st, "train", None), "growth", None)
        return [growth.from_] if getattr(growth, "method", None) == "g_stack" else []

    @staticmethod
    def _grow(inputs: StageInputs, model):
        """train.growth: the stage's (deeper) model starts from the named earlier stage's, stacked (G_stack)."""
        g = inputs.train.growth
        with inputs.context("train.growth"):
            return g_stack(inputs.earlier[g.from_].model, model, g.factor)

    def preflight(self, inputs: StageInputs):
        if getattr(inputs.train.growth, "method", None) == "v_cycle":
            raise AttarError(f"stage {inputs.name!r}: train.growth v_cycle trains causal language models (model: "
                             "{byte: ...} or {hf: FOLDER}); an image or table model's blocks are not one list of "
                             "identical transformer blocks to halve (use g_stack, or drop train.growth).")
        if inputs.train.growth is not None and inputs.model is not None:  # shapes checked on the stand-ins
            self._grow(inputs, copy.deepcopy(inputs.model))
        # data {stage: X} is read from X's source until X has run: its shape holds, its labels may not
        check_selector(inputs.selector, stage=inputs.spec, objective=inputs.objective,
                       input_shape=inputs.data.input_shape,
                       labels=None if inputs.spec.data is not None and inputs.spec.data.stage else inputs.data.train.y,
                       where=f"stage {inputs.name!r} (stages[{inputs.index}].selector)")
        if inputs.train.augment:
            with inputs.context("train.augment"):
                make_augment(inputs.train.augment)
        self._check_objective_setup(inputs)
        return None

    @staticmethod
    def _check_objective_setup(inputs: StageInputs) -> None:
        """Set the objective up on untrained copies of the student and teachers, so a bad feature-hook path
        fails now, not after the earlier stages have trained."""
        if inputs.model is None or any(t is None for t in inputs.teachers):
            return  # a model another kind produces (finetune, a pretrained merge input): checked when it runs
        with inputs.context("objective"):
            inputs.objective.setup(copy.deepcopy(inputs.model), [copy.deepcopy(t) for t in inputs.teachers],
                                   len(inputs.data.classes), len(inputs.data.train.x))

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        bundle, spec = inputs.data, inputs.model_spec
        done = ctx.stage_dir / "model" / "manifest.json"
        if ctx.resume and done.exists():
            model, _ = load_model(ctx.stage_dir / "model")
            inputs.log(f"  finished earlier: loaded {ctx.stage_dir / 'model'}")
            hist = ctx.stage_dir / "history.json"
            return StageResult(model, spec, json.loads(hist.read_text()) if hist.exists() else [])
        cfg = inputs.train
        if cfg.growth is not None:  # (a resumed run's checkpoint then replaces these weights, as any start's)
            self._grow(inputs, inputs.model)
        augment = None
        if cfg.augment:
            augment = make_augment(cfg.augment)
        trainer = Trainer(
            inputs.model, inputs.objective, bundle.train.x, bundle.train.y, cfg,
            seed=inputs.seed, teachers=inputs.teachers, val=(bundle.val.x, bundle.val.y),
            ckpt_dir=ctx.stage_dir / "checkpoints", on_metrics=ctx.on_metrics, augment=augment,
            teacher_cache=inputs.teacher_cache(), name=inputs.name, num_classes=len(bundle.classes),
            selector=inputs.selector, accept_changed_config=ctx.accept_changed_settings,
        )
        result = trainer.fit(resume=ctx.resume)
        extra = {"teacher": result.teacher_mode, "train_s": round(result.seconds, 1), "steps": result.steps,
                 "samples": result.samples_seen}
        if result.selection:
            extra["selection"] = ", ".join(f"{k} {v:.4g}" for k, v in result.selection.items())
        if dist.is_main():
            save_model(ctx.stage_dir / "model", result.model, spec, bundle.input_shape, len(bundle.classes),
                       bundle.mean, bundle.std, extra={"stage": inputs.name, "classes": bundle.classes})
            atomic_write_json(ctx.stage_dir / "history.json", result.history)
            remove_tree(ctx.stage_dir / "checkpoints", ctx.run_dir)
        dist.barrier()
        return StageResult(result.model, spec, result.history, extra, artifacts={"model": ctx.stage_dir / "model"})


@STAGES.register("distill")
class DistillStage(TrainStage):
    """Train a student against one or more teachers (default objective ``kd``)."""

    @classmethod
    def check(cls, st) -> None:
        super().check(st)
        if st.teacher is None:
            raise ValueError(f"distill stage {st.name!r} needs a 'teacher' (an earlier stage name or a model spec)")


@STAGES.register("evaluate")
class EvaluateStage(StageKind):
    """Score a model (``model`` spec, e.g. a pretrained teacher, or an ``init`` stage) on the stage's data."""

    @classmethod
    def check(cls, st) -> None:
        if st.model is None and st.init is None:
            raise ValueError(f"evaluate stage {st.name!r} needs a 'model' spec or an 'init' stage")

    def run(self, inputs: StageInputs, ctx: StageContext) -> StageResult:
        return StageResult(inputs.model, inputs.model_spec)
