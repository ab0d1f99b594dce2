"""``train`` and ``distill`` stages: the one trainer on an image/table data set; ``evaluate``: score a model."""

from __future__ import annotations

import json

from attar.paths import remove_tree
from attar.stages.base import STAGES, StageContext, StageKind, StageResult
from attar.train import distributed as dist


@STAGES.register("train")
class TrainStage(StageKind):
    """Train a model (``model`` spec or ``init`` stage) with an objective (default ``ce``)."""

    trains = True

    @classmethod
    def check(cls, st) -> None:
        if st.model is None and st.init is None:
            raise ValueError(f"stage {st.name!r} needs a 'model' spec or an 'init' stage to start from")

    def preflight(self, pipe, st, index):
        from attar.select.base import check_selector

        objective = pipe.objective_for(st, index)
        data = pipe.recipe.stage_data(st)
        bundle = pipe.bundle(data)  # loaded (and cached) by the pipeline's preflight already
        # data {stage: X} is read from X's source until X has run: its shape holds, its labels may not
        check_selector(pipe.selector_for(st, index), stage=st, objective=objective, input_shape=bundle.input_shape,
                       labels=None if data.stage else bundle.train.y,
                       where=f"stage {st.name!r} (stages[{index}].selector)")
        if st.train.augment:
            from attar.data import make_augment
            from attar.errors import AttarError

            try:
                make_augment(st.train.augment)
            except AttarError as e:
                raise AttarError(f"stage {st.name!r} (stages[{index}].train.augment): {e}") from None
        self._check_objective_setup(pipe, st, index, objective, bundle)
        return None

    @staticmethod
    def _check_objective_setup(pipe, st, index, objective, bundle) -> None:
        """Set the objective up on untrained copies of the student and teachers, so a bad feature-hook path
        fails now, not after the earlier stages have trained."""
        import copy

        from attar.errors import AttarError

        student = pipe.preflight_models.get(st.name)
        teachers = [pipe.preflight_models.get(r) if isinstance(r, str) else pipe.teacher_model_for_preflight(r)
                    for r in st.teachers()]
        if student is None or any(t is None for t in teachers):
            return  # a model another kind produces (merge, finetune): checked when it runs
        try:
            objective.setup(copy.deepcopy(student), [copy.deepcopy(t) for t in teachers], len(bundle.classes),
                            len(bundle.train.x))
        except AttarError as e:
            raise AttarError(f"stage {st.name!r} (stages[{index}].objective): {e}") from None

    def run(self, pipe, st, ctx: StageContext) -> StageResult:
        from attar.models import load_model, save_model
        from attar.train.trainer import Trainer

        bundle = pipe.bundle(pipe.recipe.stage_data(st))
        model, spec = pipe.student_for(st, bundle)
        done = ctx.stage_dir / "model" / "manifest.json"
        if ctx.resume and done.exists():
            model, _ = load_model(ctx.stage_dir / "model")
            pipe.log(f"  finished earlier: loaded {ctx.stage_dir / 'model'}")
            hist = ctx.stage_dir / "history.json"
            return StageResult(model, spec, json.loads(hist.read_text()) if hist.exists() else [])
        teachers = pipe.teachers_for(st, bundle)
        objective = pipe.objective_for(st, ctx.index)
        cfg = st.train
        augment = None
        if cfg.augment:
            from attar.data import make_augment

            augment = make_augment(cfg.augment)
        cache = pipe.teacher_cache_for(st, objective, teachers, bundle.train.x, cfg)
        trainer = Trainer(
            model, objective, bundle.train.x, bundle.train.y, cfg,
            seed=pipe.recipe.stage_seed(st), teachers=teachers, val=(bundle.val.x, bundle.val.y),
            ckpt_dir=ctx.stage_dir / "checkpoints", on_metrics=ctx.on_metrics, augment=augment,
            teacher_cache=cache, name=st.name, num_classes=len(bundle.classes),
            selector=pipe.selector_for(st, ctx.index), accept_changed_config=ctx.accept_changed_settings,
        )
        result = trainer.fit(resume=ctx.resume)
        extra = {"teacher": result.teacher_mode, "train_s": round(result.seconds, 1), "steps": result.steps,
                 "samples": result.samples_seen}
        if result.selection:
            extra["selection"] = ", ".join(f"{k} {v:.4g}" for k, v in result.selection.items())
        if dist.is_main():
            save_model(ctx.stage_dir / "model", result.model, spec, bundle.input_shape, len(bundle.classes),
                       bundle.mean, bundle.std, extra={"stage": st.name, "classes": bundle.classes})
            from attar.checkpoint import atomic_write_json

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

    def run(self, pipe, st, ctx: StageContext) -> StageResult:
        bundle = pipe.bundle(pipe.recipe.stage_data(st))
        model, spec = pipe.student_for(st, bundle)
        return StageResult(model, spec)
