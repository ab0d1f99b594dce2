"""Recording a run: its folder, lock, store rows, metrics, artifacts and report.

Why apart from the loop: what a stage computes and how a run is recorded change for different reasons. The
recorder owns the run folder and the SQLite store; it opens (or resumes) the run, checks that a resume continues
the recipe the run recorded, scores each stage's model on the test split unless the stage scored itself, and
writes the report at the end. Only the main process records (under torchrun every rank runs the stages).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable

from attar.checkpoint import atomic_write_bytes, atomic_write_json
from attar.errors import AttarError
from attar.lifecycle import (
    NO_SPACE,
    RunInterrupted,
    no_space_error,
    read_run_json,
    run_lock,
)
from attar.metrics import classification_metrics
from attar.models import model_size
from attar.recipe import Recipe, is_neutral_field, is_optim_field, parse_recipe, recipe_diff, stage_index
from attar.report import write_report
from attar.stages import StageResult
from attar.store import RunStore, make_run_dir, now_iso
from attar.train import distributed as dist
from attar.train.tensorboard_log import TensorBoardSink
from attar.train.trainer import predict

Change = tuple[str, Any, Any]


class RunRecorder:
    def __init__(self, recipe: Recipe, text: str, home: Path, held: contextlib.ExitStack, log: Callable[..., None],
                 tensorboard: bool = False):
        self.recipe, self.text, self.home, self.held, self.log = recipe, text, home, held, log
        self.tensorboard = tensorboard  # every stage's metrics also as TensorBoard events (else per train.log_to)
        self.boards: dict[str, TensorBoardSink] = {}
        self.store: RunStore | None = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self.rows: list[dict] = []
        self.curves: dict[str, dict] = {}

    # ------------------------------------------------------------------ opening
    def open(self, resume_dir: Path | None, allow_optim_change: bool) -> Path:
        """Create (or reopen) the run folder and its store row, holding the run lock until the run ends."""
        run_id = read_run_json(resume_dir)["run_id"] if resume_dir is not None else None
        if dist.is_main():
            self.store = self.held.enter_context(RunStore(self.home / "runs.db"))
            if run_id is None:
                run_id, run_dir = make_run_dir(self.home)
                self.held.enter_context(run_lock(run_dir))  # before the store row says running
                self.store.start_run(self.recipe.name, self.text, str(run_dir), self.recipe.seed, run_id=run_id)
                atomic_write_json(run_dir / "run.json", {"run_id": run_id, "recipe": self.recipe.name})
                atomic_write_bytes(run_dir / "recipe.yaml", self.text.encode())
            else:
                self.held.enter_context(run_lock(resume_dir))  # a second process resuming this run is refused here
                changes = self.check_resume(resume_dir, run_id, allow_optim_change)
                self.store.resume_run(run_id)
                if changes:
                    self.record_changes(resume_dir, run_id, changes)
        self.run_id = dist.broadcast_object(run_id)
        self.run_dir = self.home / self.run_id if resume_dir is None else Path(resume_dir)
        return self.run_dir

    def check_resume(self, run_dir: Path, run_id: str, allow_optim_change: bool) -> list[Change]:
        """Compare this recipe with the one the run was started with; refuse unless they agree.

        Why: the run's recipe.yaml and the store must describe exactly what produced its weights. Only
        optimiser settings of stages that have not finished may change, and only on explicit request."""
        own = run_dir / "recipe.yaml"
        if not own.exists():
            raise AttarError(f"{run_dir} has no recipe.yaml, so a resume cannot check it continues the same recipe; "
                             "pass the run folder runs/<id> that `attar run` created.")
        all_changes = recipe_diff(parse_recipe(own.read_text(), str(own)), self.recipe)
        changes = [c for c in all_changes if not is_neutral_field(c[0])]
        if not changes:
            return all_changes  # none, or only where stages run / what they log: recorded, no weight depends on it
        diff = "\n".join(f"    {p}: {_show(a)} -> {_show(b)}" for p, a, b in changes)
        if any(not is_optim_field(p) for p, _, _ in changes):
            raise AttarError(
                f"This recipe differs from the one run {run_dir} was started with, so the run's record would no "
                f"longer match its weights:\n{diff}\nResume with the run's own recipe (`attar run --resume {run_dir}` "
                "with no recipe argument) or start a new run with the changed recipe."
            )
        done = {s["name"] for s in self.store.list_stages(run_id) if s["status"] == "done"}
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
        return all_changes

    def record_changes(self, run_dir: Path, run_id: str, changes: list[Change]) -> None:
        meta = json.loads((run_dir / "run.json").read_text())
        meta.setdefault("resumed_with_changes", []).append(
            {"at": now_iso(), "changes": [{"field": p, "old": a, "new": b} for p, a, b in changes]})
        atomic_write_json(run_dir / "run.json", meta)
        atomic_write_bytes(run_dir / "recipe.yaml", self.text.encode())
        self.store.update_recipe(run_id, self.text)
        self.log("  resumed with changed settings: " + ", ".join(f"{p} {_show(a)} -> {_show(b)}" for p, a, b in changes))

    # ------------------------------------------------------------------ stages
    def start_stage(self, st, index: int) -> Callable[[int, dict], None] | None:
        """Record the stage as running; returns the metric sink its trainer reports to (the store, and TensorBoard
        event files in ``<run>/<stage>/tensorboard/`` when asked)."""
        if self.store is None:
            return None
        self.store.start_stage(self.run_id, st.name, st.kind, index, st.model_dump(mode="json"))
        if self.tensorboard or "tensorboard" in st.train.log_to:
            self.boards[st.name] = TensorBoardSink(self.run_dir / st.name / "tensorboard")
        return lambda step, m, _s=st.name: self._log_metrics(_s, step, m)

    def _log_metrics(self, stage: str, step: int, values: dict) -> None:
        self.store.log_metrics(self.run_id, stage, step, values)
        if stage in self.boards:
            self.boards[stage](step, values)

    def _close_boards(self) -> None:
        for board in self.boards.values():
            board.close()
        self.boards.clear()

    def finish_stage(self, st, res: StageResult, bundle) -> dict:
        """Score and record a finished stage; returns its report row."""
        if self.store is None:
            return {}

        row: dict[str, Any] = {"stage": st.name, "kind": st.kind}
        if res.metrics is not None:
            row.update({k: v for k, v in res.metrics.items() if v is not None})
            final = {f"test_{k}": float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))}
        elif res.model is not None:
            m = classification_metrics(predict(res.model, bundle.test.x), bundle.test.y)
            size = model_size(res.model, bundle.input_shape)
            row.update({"accuracy": m["accuracy"], "nll": m["nll"], "ece": m["ece"],
                        **{k: size[k] for k in ("params", "bytes", "latency_ms_b1", "latency_ms_b256")}})
            final = {f"test_{k}": float(v) for k, v in m.items()}
        else:
            final = {}
        row.update(res.extra)
        self.rows.append(row)
        self.curves[st.name] = {
            "train_loss": [(h["step"], h["train_loss"]) for h in res.history if "train_loss" in h],
            "val_accuracy": [(h["step"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h],
        }
        if final:
            self._log_metrics(st.name, res.history[-1]["step"] if res.history else 0, final)
        if st.name in self.boards:
            self.boards.pop(st.name).close()
        for name, path in res.artifacts.items():
            if Path(path).exists():
                self.store.add_artifact(self.run_id, st.name, name, name if name == "data" else "model", str(path))
        self.store.finish_stage(self.run_id, st.name, "done")
        self.log("  " + "  ".join(_fmt(k, row[k]) for k in ("accuracy", "nll", "ece", "test_ppl", "teacher_test_ppl",
                                                            "kl_to_teacher", "top1_agreement", "params", "images")
                                   if k in row))
        return row

    # ------------------------------------------------------------------ closing
    def finish(self) -> None:
        """Write the report and mark the run done."""
        if self.store is None:
            return

        notes = [f"Recipe: {self.recipe.name}; seed {self.recipe.seed}.",
                 "Accuracy, NLL and ECE are on the held-out test split; validation was carved from train."]
        paths = write_report(self.run_dir, f"attar run {self.run_id}: {self.recipe.name}", self.rows, self.curves, notes)
        for name, p in paths.items():
            self.store.add_artifact(self.run_id, None, name, "report", str(p))
        self.store.finish_run(self.run_id, "done")
        self.log(f"report: {self.run_dir / 'report.md'}  (and report.html)")

    def fail(self, exc: BaseException) -> BaseException:
        """Record how the run ended (``interrupted`` for SIGTERM/Ctrl-C, else ``failed``); returns the error to
        raise (a full disk becomes one paragraph that says what was kept)."""
        e = exc
        with contextlib.suppress(Exception):  # flush what TensorBoard has; the error below is the one to report
            self._close_boards()
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            e = no_space_error(exc.filename or f"a file under {self.run_dir}", self.run_dir)
        if isinstance(e, RunInterrupted):
            e.run_dir = str(self.run_dir)  # for the CLI's "resume with" line
        if self.store is not None and self.run_id:
            with contextlib.suppress(AttarError):  # a full disk may refuse this row too; `runs list` repairs it
                self.store.finish_run(self.run_id, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                                      error=str(e) or type(e).__name__)
        return e


def _show(v) -> str:
    return "(unset)" if v is None or v.__class__ is object else json.dumps(v)


def _fmt(key: str, v) -> str:
    if key == "accuracy":
        return f"test accuracy {v:.4f}"
    if key == "params":
        return f"params {v:,}"
    return f"{key} {v:.3f}" if isinstance(v, float) else f"{key} {v}"
