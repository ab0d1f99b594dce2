"""Runs a recipe's stages in order: resolve each stage's inputs, let its kind run, record what comes back.

Everything that can be checked before work starts (recipe fields, models on untrained stand-ins, objective
parameters and hooks, data availability, class counts, each kind's own checks) is checked first, so a bad
recipe fails in seconds and leaves no run folder behind. The pieces: :class:`Resolver` (stage -> inputs),
the stage kinds (``attar.stages``, inputs -> result) and :class:`RunRecorder` (folder, lock, store, report).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from attar.errors import AttarError
from attar.lifecycle import stop_on_signals
from attar.paths import check_no_symlinks
from attar.paths import home as runs_home
from attar.pipeline.recorder import RunRecorder
from attar.pipeline.resolve import Resolver
from attar.recipe import Recipe, StageSpec, load_recipe
from attar.stages import EarlierStage, StageContext, StageInputs
from attar.stages.lm import LMStage
from attar.train import distributed as dist
from attar.train.tensorboard_log import require_tensorboard

__all__ = ["Pipeline", "Resolver", "RunRecorder", "run_recipe"]


class Pipeline:
    def __init__(self, recipe: Recipe, recipe_text: str, home: Path | None = None, log=print,
                 tensorboard: bool = False):
        self.recipe = recipe
        self.text = recipe_text
        self.tensorboard = tensorboard  # `attar run --tensorboard`: every stage, whatever its train.log_to says
        self.home = runs_home(home)
        self.log = log if dist.is_main() else (lambda *a, **k: None)
        self.resolver = Resolver(recipe, self.home / "cache", self.log)
        self.rows: list[dict] = []

    @property
    def outputs(self) -> dict[str, EarlierStage]:
        """Each stage's output (model, spec, classes, data) once it has run, by name."""
        return self.resolver.earlier

    # ------------------------------------------------------------------ preflight
    def preflight(self) -> None:
        """Resolve every stage on untrained stand-ins and run the checks that need no training: models build and
        take the data's inputs, class counts agree, each kind's own checks pass. Nothing is written."""
        if self.tensorboard or any("tensorboard" in st.train.log_to for st in self.recipe.stages):
            require_tensorboard("--tensorboard" if self.tensorboard else "This recipe's train.log_to")
        earlier = self.resolver.earlier
        earlier.clear()
        for i, st in enumerate(self.recipe.stages):
            kind = st.kind_spec()()
            inputs = self.resolver.resolve(st, i, preflight=True)
            if kind.needs_data:
                self._check_models(st, inputs)
            got = kind.preflight(inputs)
            like = st.kind_spec().produces_model_like(st)
            stand_in = earlier[like].model if like else inputs.model
            earlier[st.name] = EarlierStage(st.name, st.kind, stand_in, inputs.model_spec,
                                            classes=got if got is not None else inputs.classes,
                                            causal_lm=_causal_lm(st))
        earlier.clear()

    def _check_models(self, st: StageSpec, inputs: StageInputs) -> None:
        n, probe, earlier = inputs.classes, inputs.data.train.x[:2], self.resolver.earlier
        if st.init:
            self._check_classes(st, f"the init stage {st.init!r}", earlier[st.init].classes, n)
        elif inputs.model is not None:
            self._check_classes(st, "the model", _width(inputs.model, probe), n)
        specs = [r for r in st.teachers() if not isinstance(r, str)]
        for j, (ref, teacher) in enumerate(zip(st.teachers(), inputs.teachers)):
            if isinstance(ref, str):
                self._check_classes(st, f"teacher {ref!r}", earlier[ref].classes, n)
            else:
                self._check_classes(st, f"teacher spec #{specs.index(ref) + 1}", _width(teacher, probe), n)

    @staticmethod
    def _check_classes(stage: StageSpec, what: str, got: int | None, want: int) -> None:
        if got is not None and got != want:
            raise AttarError(
                f"stage {stage.name!r}: {what} predicts {got} classes but the stage's data has {want}. "
                "Distillation compares class distributions one to one, so they must agree: use a teacher trained "
                "on the same classes, or data with the classes the teacher knows."
            )

    # ------------------------------------------------------------------ run
    def run(self, resume_dir: Path | None = None, allow_optim_change: bool = False) -> Path:
        """Run (or resume) the recipe. The run lock, the store and the SIGTERM/Ctrl-C handlers
        (attar.lifecycle) are held until this returns, whichever way it ends."""
        self.preflight()
        with contextlib.ExitStack() as held:
            rec = RunRecorder(self.recipe, self.text, self.home, held, self.log, tensorboard=self.tensorboard)
            run_dir = rec.open(resume_dir, allow_optim_change)
            self.log(f"run {rec.run_id}  ->  {run_dir}")
            held.enter_context(stop_on_signals())
            try:
                for i, st in enumerate(self.recipe.stages):
                    self.log(f"[{i + 1}/{len(self.recipe.stages)}] stage {st.name} ({st.kind})")
                    on_metrics = rec.start_stage(st, i)
                    check_no_symlinks(run_dir, run_dir / st.name)  # every write and delete stays in the run
                    ctx = StageContext(run_dir, run_dir / st.name, i, resume=resume_dir is not None,
                                       on_metrics=on_metrics, accept_changed_settings=allow_optim_change)
                    inputs = self.resolver.resolve(st, i)
                    res = st.kind_spec()().run(inputs, ctx)
                    self.outputs[st.name] = EarlierStage(st.name, st.kind, res.model, res.spec,
                                                         classes=inputs.classes, data=res.data,
                                                         causal_lm=_causal_lm(st))
                    rec.finish_stage(st, res, inputs.data)
                rec.finish()
            except BaseException as exc:
                e = rec.fail(exc)
                if e is exc:
                    raise
                raise e from None
        self.rows = rec.rows
        return run_dir


def _causal_lm(st: StageSpec) -> bool:
    """Whether the stage's output is a causal LM (an LM stage, or a merge of LM stages)."""
    return st.kind_spec() is LMStage or bool(getattr(st.kind_spec(), "causal_lm", False))


def _width(model: torch.nn.Module, probe: torch.Tensor) -> int:
    """The number of outputs ``model`` gives for two real rows (a probe that catches shape mistakes)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        return model.eval()(probe).shape[-1]


def run_recipe(path: str | Path, resume_dir: str | Path | None = None, home: Path | None = None,
               allow_optim_change: bool = False, tensorboard: bool = False) -> Path:
    recipe, text = load_recipe(path)
    dist.maybe_init()
    pipeline = Pipeline(recipe, text, home=home, tensorboard=tensorboard)
    return pipeline.run(Path(resume_dir) if resume_dir else None, allow_optim_change=allow_optim_change)
