"""Runs a recipe's stages in order, wires artifacts between them, and records the run.

Everything that can be checked before work starts (recipe fields, objective
parameters, data availability, teacher/student class counts) is checked first,
so a bad recipe fails in seconds and leaves no run folder behind.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attar.checkpoint import atomic_write_json
from attar.errors import AttarError
from attar.lifecycle import NO_SPACE, RunInterrupted, no_space_error, read_run_json, run_lock, stop_on_signals
from attar.paths import check_no_symlinks
from attar.paths import home as runs_home
from attar.recipe import Recipe, StageSpec, TrainConfig, is_optim_field, load_recipe, parse_recipe, recipe_diff, stage_index
from attar.specs import DataSpec, ModelSpec
from attar.train import distributed as dist


@dataclass
class StageOutput:
    name: str
    model: nn.Module
    spec: dict
    row: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    data: Path | None = None


@dataclass
class _Probed:
    module: nn.Module
    out_dim: int


class Pipeline:
    def __init__(self, recipe: Recipe, recipe_text: str, home: Path | None = None, log=print):
        self.recipe = recipe
        self.text = recipe_text
        self.home = runs_home(home)
        self.log = log if dist.is_main() else (lambda *a, **k: None)
        self._bundles: dict[str, object] = {}
        self._teacher_models: dict[str, nn.Module] = {}
        self.outputs: dict[str, StageOutput] = {}
        self.stage_classes: dict[str, int] = {}
        self.preflight_models: dict[str, nn.Module] = {}  # untrained stand-ins, for checks that need the architecture

    # ------------------------------------------------------------------ resolution helpers
    def resolve_data(self, spec: DataSpec) -> DataSpec:
        """``{stage: X}`` -> the data set stage X wrote; before X has run (preflight), X's own source data,
        which has the same shape and classes. Recipes only refer to earlier stages, so the chain ends."""
        while spec.stage:
            out = self.outputs.get(spec.stage)
            if out is not None and out.data is not None:
                return DataSpec(artifact=str(out.data))
            src = next(s for s in self.recipe.stages if s.name == spec.stage)
            if out is not None or not src.kind_spec().writes_data:
                from attar.stages import STAGES

                writers = ", ".join(k for k in STAGES if STAGES.get(k).writes_data)
                raise AttarError(f"data {{stage: {spec.stage}}}: stage {spec.stage!r} ({src.kind}) writes no data set; "
                                 f"only {writers} stages do.")
            spec = self.recipe.stage_data(src)
        return spec

    @staticmethod
    def error(stage: StageSpec, msg: str) -> AttarError:
        return AttarError(f"stage {stage.name!r} ({stage.kind}): {msg}")

    def bundle(self, spec: DataSpec):
        from attar.data import load_data

        spec = self.resolve_data(spec)
        key = spec.model_dump_json()
        if key not in self._bundles:
            self._bundles[key] = load_data(spec)
        return self._bundles[key]

    def _model_from_spec(self, spec: ModelSpec, bundle) -> nn.Module:
        from attar.models import build_model, load_model

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

    def student_for(self, stage: StageSpec, bundle) -> tuple[nn.Module, dict]:
        if stage.init:
            src = self.outputs[stage.init]
            return copy.deepcopy(src.model), src.spec
        assert stage.model is not None
        torch.manual_seed(self.recipe.stage_seed(stage))  # the student's initial weights depend on the seed only
        return self._model_from_spec(stage.model, bundle), stage.model.model_dump(exclude_none=True)

    def teachers_for(self, stage: StageSpec, bundle) -> list[nn.Module]:
        out = []
        for ref in stage.teachers():
            if isinstance(ref, str):
                out.append(self.outputs[ref].model)
            else:
                key = ref.model_dump_json()
                if key not in self._teacher_models:
                    self._teacher_models[key] = self._model_from_spec(ref, bundle)
                out.append(self._teacher_models[key])
        return out

    def objective_for(self, stage: StageSpec, index: int):
        from attar.distill.objectives import build_objective

        spec = stage.objective or {"name": "kd" if stage.kind == "distill" else "ce"}
        try:
            obj = build_objective(spec)
        except AttarError as e:
            raise AttarError(f"stage {stage.name!r} (stages[{index}].objective): {e}") from None
        if obj.needs_teacher and not stage.teachers():
            raise AttarError(
                f"stage {stage.name!r}: objective {spec['name']!r} needs a teacher; add `teacher:` "
                "(an earlier stage name or a model spec) or use kind: train with objective ce."
            )
        return obj

    @staticmethod
    def selector_for(stage: StageSpec, index: int):
        from attar.select import build_selector

        try:
            return build_selector(stage.selector)
        except AttarError as e:
            raise AttarError(f"stage {stage.name!r} (stages[{index}].selector): {e}") from None

    @staticmethod
    def _check_classes(stage: StageSpec, what: str, got: int, want: int) -> None:
        if got != want:
            raise AttarError(
                f"stage {stage.name!r}: {what} predicts {got} classes but the stage's data has {want}. "
                "Distillation compares class distributions one to one, so they must agree: use a teacher trained "
                "on the same classes, or data with the classes the teacher knows."
            )

    # ------------------------------------------------------------------ preflight
    def preflight(self) -> None:
        """Validate everything cheap to validate before any run folder exists: data, models, class counts,
        objectives, each kind's own checks. A bad recipe fails here in seconds and leaves nothing behind."""
        classes = self.stage_classes
        for i, st in enumerate(self.recipe.stages):
            kind = st.kind_spec()()
            if kind.needs_data:
                bundle = self.bundle(self.recipe.stage_data(st))
                n = len(bundle.classes)
                probe = bundle.train.x[:2]
                if st.init:
                    self._check_classes(st, f"the init stage {st.init!r}", classes[st.init], n)
                    if st.init in self.preflight_models:
                        self.preflight_models[st.name] = self.preflight_models[st.init]
                elif st.model is not None and not st.model.hf:
                    model = self._preflight_model(st, i, bundle, probe)
                    self._check_classes(st, "the model", model.out_dim, n)
                    self.preflight_models[st.name] = model.module
                for j, dim in enumerate(self.teachers_for_preflight(st, bundle)):
                    self._check_classes(st, f"teacher spec #{j + 1}", dim, n)
                for ref in st.teachers():
                    if isinstance(ref, str) and classes.get(ref) is not None:
                        self._check_classes(st, f"teacher {ref!r}", classes[ref], n)
                classes[st.name] = n
            got = kind.preflight(self, st, i)
            if got is not None:
                classes[st.name] = got

    def _preflight_model(self, st: StageSpec, index: int, bundle, probe: torch.Tensor):
        """Build the stage's model (untrained) and run two rows through it, so an unknown architecture, a bad
        argument or a net too deep for the inputs fails before any run folder exists. The global RNG is left as
        it was: the run builds the real model from its seed later."""
        with torch.random.fork_rng(devices=[]):
            try:
                model = self._model_from_spec(st.model, bundle)
                with torch.no_grad():
                    out = model.eval()(probe)
            except AttarError as e:
                raise AttarError(f"stage {st.name!r} (stages[{index}].model): {e}") from None
        return _Probed(model, out.shape[-1])

    def teacher_model_for_preflight(self, ref: ModelSpec) -> nn.Module | None:
        """A teacher given as a model spec, as built by :meth:`teachers_for_preflight`."""
        return self._teacher_models.get(ref.model_dump_json())

    def teachers_for_preflight(self, stage: StageSpec, bundle) -> list[int]:
        """Output width of each teacher given as a spec (built once and kept for the run)."""
        dims = []
        for ref in stage.teachers():
            if isinstance(ref, str):
                continue
            key = ref.model_dump_json()
            if key not in self._teacher_models:
                self._teacher_models[key] = self._model_from_spec(ref, bundle)
            with torch.no_grad():
                dims.append(self._teacher_models[key].eval()(bundle.train.x[:2]).shape[-1])
        return dims

    # ------------------------------------------------------------------ teacher cache
    def teacher_cache_for(self, stage: StageSpec, objective, teachers: list[nn.Module], x: torch.Tensor, cfg: TrainConfig):
        if not objective.needs_teacher or objective.needs_live_teacher or cfg.teacher_cache == "off":
            return None
        if cfg.teacher_cache == "auto" and cfg.augment:
            return None  # the teacher must see the student's augmented view: run it live
        from attar.distill.teacher_cache import TeacherCache

        h = hashlib.sha256()
        for t in teachers:
            for k, v in sorted(t.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        h.update(x.numpy().tobytes()[:: max(1, x.numel() // 100_000)])
        h.update(f"{x.shape}{cfg.cache_topk}".encode())
        path = self.home / "cache" / f"teacher-{h.hexdigest()[:20]}.safetensors"
        if path.exists():
            self.log(f"  teacher outputs: reusing cache {path}")
            return TeacherCache.load(path)
        self.log(f"  teacher outputs: computing once for {len(x)} rows (cached at {path})")
        cache = TeacherCache.build(teachers, x, k=cfg.cache_topk)
        if dist.is_main():
            cache.save(path)
        return cache

    # ------------------------------------------------------------------ resume
    def check_resume(self, run_dir: Path, store, run_id: str, allow_optim_change: bool) -> list[tuple[str, Any, Any]]:
        """Compare this recipe with the one the run was started with; refuse unless they agree.

        Why: the run's recipe.yaml and the store must describe exactly what produced its weights. Only
        optimiser settings of stages that have not finished may change, and only on explicit request."""
        own = run_dir / "recipe.yaml"
        if not own.exists():
            raise AttarError(f"{run_dir} has no recipe.yaml, so a resume cannot check it continues the same recipe; "
                             "pass the run folder runs/<id> that `attar run` created.")
        changes = recipe_diff(parse_recipe(own.read_text(), str(own)), self.recipe)
        if not changes:
            return []
        diff = "\n".join(f"    {p}: {_show(a)} -> {_show(b)}" for p, a, b in changes)
        fixed = [c for c in changes if not is_optim_field(c[0])]
        if fixed:
            raise AttarError(
                f"This recipe differs from the one run {run_dir} was started with, so the run's record would no "
                f"longer match its weights:\n{diff}\nResume with the run's own recipe (`attar run --resume {run_dir}` "
                "with no recipe argument) or start a new run with the changed recipe."
            )
        done = {s["name"] for s in store.list_stages(run_id) if s["status"] == "done"}
        finished = sorted({self.recipe.stages[stage_index(p)].name for p, _, _ in changes} & done)
        if finished:
            raise AttarError(
                f"This recipe changes the training settings of stage(s) {', '.join(finished)}, which already finished "
                f"with the old ones:\n{diff}\nTheir weights cannot follow the new settings; start a new run instead."
            )
        if not allow_optim_change:
            raise AttarError(
                f"This recipe changes optimiser settings of run {run_dir}:\n{diff}\nTo continue the unfinished "
                "stages with the new settings from their last checkpoint, pass --allow-optim-change (the change is "
                "recorded in the run's recipe.yaml, run.json and the run store); otherwise resume without a recipe."
            )
        return changes

    def record_changes(self, run_dir: Path, store, run_id: str, changes: list[tuple[str, Any, Any]]) -> None:
        from attar.checkpoint import atomic_write_bytes
        from attar.store import now_iso

        meta_path = run_dir / "run.json"
        meta = json.loads(meta_path.read_text())
        meta.setdefault("resumed_with_changes", []).append(
            {"at": now_iso(), "changes": [{"field": p, "old": a, "new": b} for p, a, b in changes]})
        atomic_write_json(meta_path, meta)
        atomic_write_bytes(run_dir / "recipe.yaml", self.text.encode())
        store.update_recipe(run_id, self.text)
        self.log("  resumed with changed settings: " + ", ".join(f"{p} {_show(a)} -> {_show(b)}" for p, a, b in changes))

    # ------------------------------------------------------------------ run
    def run(self, resume_dir: Path | None = None, allow_optim_change: bool = False) -> Path:
        """Run (or resume) the recipe. The run lock and the SIGTERM/Ctrl-C handlers (attar.lifecycle) are held
        in ``self._held`` until this returns, whichever way it ends."""
        with contextlib.ExitStack() as self._held:
            return self._run(resume_dir, allow_optim_change)

    def _run(self, resume_dir: Path | None, allow_optim_change: bool) -> Path:
        from attar.metrics import classification_metrics
        from attar.models import model_size
        from attar.report import write_report
        from attar.stages import StageContext
        from attar.store import RunStore, make_run_dir
        from attar.train.trainer import predict

        self.preflight()
        store = None
        if resume_dir is not None:
            run_dir = Path(resume_dir)
            run_id = read_run_json(run_dir)["run_id"]
        else:
            run_id = None
        if dist.is_main():
            store = RunStore(self.home / "runs.db")
            if run_id is None:
                run_id, run_dir = make_run_dir(self.home)
                self._held.enter_context(run_lock(run_dir))  # before the store row says running
                store.start_run(self.recipe.name, self.text, str(run_dir), self.recipe.seed, run_id=run_id)
                atomic_write_json(run_dir / "run.json", {"run_id": run_id, "recipe": self.recipe.name})
                (run_dir / "recipe.yaml").write_text(self.text)
            else:
                self._held.enter_context(run_lock(run_dir))  # a second process resuming this run is refused here
                changes = self.check_resume(run_dir, store, run_id, allow_optim_change)
                store.resume_run(run_id)
                if changes:
                    self.record_changes(run_dir, store, run_id, changes)
        run_id = dist.broadcast_object(run_id)
        run_dir = self.home / run_id if resume_dir is None else Path(resume_dir)
        self.log(f"run {run_id}  ->  {run_dir}")
        rows, curves = [], {}
        self._held.enter_context(stop_on_signals())
        try:
            for i, st in enumerate(self.recipe.stages):
                self.log(f"[{i + 1}/{len(self.recipe.stages)}] stage {st.name} ({st.kind})")
                if store:
                    store.start_stage(run_id, st.name, st.kind, i, st.model_dump(mode="json"))
                on_metrics = (lambda step, m, _s=st.name: store.log_metrics(run_id, _s, step, m)) if store else None
                check_no_symlinks(run_dir, run_dir / st.name)  # every write and delete of the stage stays in the run
                ctx = StageContext(run_dir, run_dir / st.name, i, resume=resume_dir is not None, on_metrics=on_metrics,
                                   accept_changed_settings=allow_optim_change)
                res = st.kind_spec()().run(self, st, ctx)
                self.outputs[st.name] = StageOutput(st.name, res.model, res.spec, history=res.history, data=res.data)
                if not dist.is_main():
                    continue
                row = {"stage": st.name, "kind": st.kind}
                if res.metrics is not None:
                    row.update({k: v for k, v in res.metrics.items() if v is not None})
                    final = {f"test_{k}": float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
                elif res.model is not None:
                    bundle = self.bundle(self.recipe.stage_data(st))
                    m = classification_metrics(predict(res.model, bundle.test.x), bundle.test.y)
                    size = model_size(res.model, bundle.input_shape)
                    row.update({"accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                                **{k: size[k] for k in ("params", "bytes", "latency_ms_b1", "latency_ms_b256")}})
                    final = {f"test_{k}": float(v) for k, v in m.items()}
                else:
                    final = {}
                row.update(res.extra)
                rows.append(row)
                self.outputs[st.name].row = row
                curves[st.name] = {
                    "train_loss": [(h["step"], h["train_loss"]) for h in res.history if "train_loss" in h],
                    "val_accuracy": [(h["step"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h],
                }
                if final:
                    store.log_metrics(run_id, st.name, res.history[-1]["step"] if res.history else 0, final)
                for name, path in res.artifacts.items():
                    if Path(path).exists():
                        store.add_artifact(run_id, st.name, name, name if name == "data" else "model", str(path))
                store.finish_stage(run_id, st.name, "done")
                self.log("  " + "  ".join(_fmt(k, row[k]) for k in ("accuracy", "nll", "ece", "params", "images") if k in row))
            if dist.is_main():
                notes = [f"Recipe: {self.recipe.name}; seed {self.recipe.seed}.",
                         "Accuracy, NLL and ECE are on the held-out test split; validation was carved from train."]
                paths = write_report(run_dir, f"attar run {run_id}: {self.recipe.name}", rows, curves, notes)
                for name, p in paths.items():
                    store.add_artifact(run_id, None, name, "report", str(p))
                store.finish_run(run_id, "done")
                self.log(f"report: {run_dir / 'report.md'}  (and report.html)")
        except BaseException as exc:
            e = exc
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                e = no_space_error(exc.filename or f"a file under {run_dir}", run_dir)
            if isinstance(e, RunInterrupted):
                e.run_dir = str(run_dir)  # for the CLI's "resume with" line
            if store and run_id:
                with contextlib.suppress(AttarError):  # a full disk may refuse this row too; `runs list` repairs it
                    store.finish_run(run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                     error=str(e) or type(e).__name__)
            if e is exc:
                raise
            raise e from None
        finally:
            if store:
                store.close()
        self.rows = rows
        return run_dir


def _show(v) -> str:
    return "(unset)" if v is None or v.__class__ is object else json.dumps(v)


def _fmt(key: str, v) -> str:
    if key == "accuracy":
        return f"test accuracy {v:.4f}"
    if key == "params":
        return f"params {v:,}"
    return f"{key} {v:.3f}" if isinstance(v, float) else f"{key} {v}"


def run_recipe(path: str | Path, resume_dir: str | Path | None = None, home: Path | None = None,
               allow_optim_change: bool = False) -> Path:
    recipe, text = load_recipe(path)
    dist.maybe_init()
    return Pipeline(recipe, text, home=home).run(Path(resume_dir) if resume_dir else None,
                                                 allow_optim_change=allow_optim_change)
