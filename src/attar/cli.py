"""Thin Typer app: parse arguments, load things, call the library. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from attar.console import err as _err
from attar.console import errors_as_messages
from attar.console import fail as _fail
from attar.errors import AttarError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="attar: distill, condense, merge and adapt models.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in and file data sets.")
runs_app = typer.Typer(no_args_is_help=True, help="The SQLite run store.")
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")


def _mount_merge() -> None:
    import functools

    from attar.merge.cli import merge_cli

    @functools.wraps(merge_cli)
    def merge(*args, **kwargs):
        try:
            merge_cli(*args, **kwargs)
        except AttarError as e:
            _fail(e)

    app.command("merge", help="Merge models named in a mergekit-style YAML config (see docs/merge.md).")(merge)

out = Console()
THREADS_HELP = "torch CPU threads (default: $OMP_NUM_THREADS, else one core left free on machines with <= 4 cores)"


def _start_long_command(threads: Optional[int], quiet: bool) -> None:
    from attar.train.progress import start_command

    start_command(quiet, threads)


@app.command()
def run(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML; omit for the built-in quickstart"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the run in this folder (runs/<id>)"),
    home: Optional[Path] = typer.Option(None, "--home", help="where runs and runs.db live (default $ATTAR_HOME or ./runs)"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, lines or summaries"),
    allow_optim_change: bool = typer.Option(
        False, "--allow-optim-change",
        help="with --resume and a recipe: continue unfinished stages with changed optimiser settings (lr, "
             "weight_decay, grad_clip, ...); the change is recorded in the run"),
):
    """Run a recipe's stages in order and write report.md / report.html.

    SIGTERM or Ctrl-C stops the run at the next training step with a checkpoint and marks it interrupted
    (exit code 143 or 130); `attar run --resume runs/<id>` continues it.
    """
    from attar.lifecycle import RunInterrupted, read_run_json
    from attar.pipeline import run_recipe
    from attar.recipe import builtin_recipe_path

    try:
        _start_long_command(threads, quiet)
        if resume is not None:
            read_run_json(resume)  # not a run folder: say so before any work
        if recipe is not None:
            path = recipe
        elif resume is not None:
            path = resume / "recipe.yaml"  # the recipe the run was started with
            if not path.exists():
                raise AttarError(f"{resume} is not an attar run folder (no recipe.yaml); pass the run folder runs/<id>.")
        else:
            path = builtin_recipe_path("quickstart")
            out.print(f"No recipe given: running the built-in quickstart ({path}).")
        run_dir = run_recipe(path, resume_dir=resume, home=home, allow_optim_change=allow_optim_change)
    except AttarError as e:
        _fail(e)
    except RunInterrupted as e:
        if e.run_dir is None:
            raise typer.Exit(e.exit_code) from None
        again = f"attar run --resume {e.run_dir}" + (f" --home {home}" if home is not None else "")
        _err.print(f"interrupted: {e}. Resume with: {again}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    from attar.train import distributed as dist

    if dist.is_main():
        out.print(f"done: {run_dir}")


@app.command()
def methods(objective: Optional[str] = typer.Argument(None, help="show the fields of this objective")):
    """List every registered method, by family (or one objective's fields)."""
    from attar.distill.divergences import DIVERGENCES
    from attar.distill.objectives import OBJECTIVES, objective_fields

    if objective:
        try:
            fields = objective_fields(objective)
        except AttarError as e:
            _fail(e)
        t = Table("field", "type", "default", "description", title=f"objective {objective}")
        for name, f in fields.items():
            t.add_row(name, str(f.get("type")), "required" if f.get("required") else str(f.get("default")),
                      str(f.get("description") or ""))
        out.print(t)
        return
    from attar.models import ARCHS, PRETRAINED
    from attar.recipe import stage_kinds

    families = {"stage kinds": stage_kinds(), "objectives": OBJECTIVES.names(), "divergences": DIVERGENCES.names(),
                "architectures": ARCHS.names(), "pretrained teachers": PRETRAINED.names()}
    from attar.adapt.base import ADAPTERS
    from attar.condense import CONDENSERS
    from attar.merge.methods import MERGE_METHODS
    from attar.select import SELECTORS

    level = {n: MERGE_METHODS.get(n).level for n in MERGE_METHODS.names()}
    families |= {"merge methods (attar merge and merge stages)": [n for n, v in level.items() if v == "tensor"],
                 "data-aware merge methods (merge stages only)": [n for n, v in level.items() if v != "tensor"],
                 "condensation methods": CONDENSERS.names(),
                 "adapters": ADAPTERS.names(), "selectors": SELECTORS.names()}
    for fam, names in families.items():
        out.print(f"[bold]{fam}[/]: {', '.join(names)}")


@app.command("recipe-schema")
def recipe_schema():
    """Print the recipe JSON schema (every accepted field, with defaults)."""
    from attar.recipe import Recipe

    out.print_json(json.dumps(Recipe.model_json_schema()))


@app.command("convert-checkpoint")
def convert_checkpoint(src: Path, dst: Path):
    """Convert a trusted PyTorch .pth/.pt state dict to safetensors (loads with weights_only=True)."""
    import torch

    from attar.checkpoint import atomic_save_safetensors

    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any loader failure plainly
        _fail(AttarError(f"could not load {src} with weights_only=True: {e}"))
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        _fail(AttarError(f"{src} is not a flat state dict of tensors; only those convert."))
    atomic_save_safetensors(obj, dst)
    out.print(f"wrote {dst} ({len(obj)} tensors)")


@data_app.command("list")
def data_list():
    """Show the built-in data sets and whether each is installed."""
    from attar.data import list_datasets

    t = Table("name", "available", "description", "install")
    for d in list_datasets():
        t.add_row(d["name"], "yes" if d["available"] else "[red]no[/]", d["description"], "" if d["available"] else d["install"])
    out.print(t)


@data_app.command("show")
def data_show(
    source: str = typer.Argument(..., help="a built-in name, an image folder, or a condensed-set folder"),
    png: Path = typer.Option(..., "--png", help="where to write the grid"),
    per_class: int = typer.Option(10, "--per-class", help="images per class (columns)"),
):
    """Render a data set's training images (or a condensed set) as a PNG grid, one row per class."""
    from attar.condense.api import render_grid
    from attar.data.artifact import SyntheticSet, is_condensed_artifact

    try:
        if Path(source).is_dir() and is_condensed_artifact(source):
            path = render_grid(source, png, per_class)
        else:
            from attar.data import load_data
            from attar.specs import DataSpec

            b = load_data(DataSpec(imagefolder=source) if Path(source).is_dir() else DataSpec(name=source))
            if not b.is_image:
                raise AttarError(f"{source!r} is a table (inputs of shape {tuple(b.input_shape)}), not images; nothing to draw.")
            s = SyntheticSet(x=b.train.x, y=b.train.y,  # inputs are in [0, 1]; render_grid takes the first per class
                             meta={"classes": b.classes, "method": "real", "ipc": per_class, "data_name": b.name})
            path = render_grid(s, png, per_class)
    except AttarError as e:
        _fail(e)
    out.print(f"wrote {path}")



def _store(home: Optional[Path]):
    """The run store, after recording runs whose process is gone (killed) as interrupted."""
    from attar.store import DB_NAME, RunStore, attar_home, check_home

    path = check_home(attar_home(home)) / DB_NAME
    if not path.exists():
        raise AttarError(f"No run store at {path}: run `attar run` first, or pass --home.")
    store = RunStore(path)
    store.mark_gone_runs()
    return store


@runs_app.command("list")
@errors_as_messages
def runs_list(limit: int = 20, home: Optional[Path] = typer.Option(None, "--home")):
    """The most recent runs (a run whose process was killed shows as interrupted)."""
    store = _store(home)
    t = Table("id", "name", "status", "started", "run dir")
    for r in store.list_runs(limit):
        t.add_row(str(r["id"]), str(r["name"]), str(r["status"]), str(r["started"]), str(r.get("run_dir") or ""))
    out.print(t)


@runs_app.command("show")
@errors_as_messages
def runs_show(run_id: str, home: Optional[Path] = typer.Option(None, "--home")):
    """One run: stages, final metrics, artifacts."""
    from rich.markup import escape

    store = _store(home)
    r = store.get_run(run_id)
    out.print(f"[bold]{r['id']}[/] {r['name']}  status={r['status']}  seed={r.get('seed')}  commit={r.get('git_commit')}")
    if r.get("error"):
        out.print(f"  {escape(r['error'])}", highlight=False)
    t = Table("stage", "metric", "value")
    for stage, ms in store.final_metrics(r["id"]).items():
        for k, v in sorted(ms.items()):
            t.add_row(str(stage), k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(t)
    for a in r.get("artifacts", []):
        out.print(f"  artifact {a['stage']}/{a['name']} ({a['kind']}): {a['path']}  sha256 {str(a['sha256'])[:12]}")


@runs_app.command("compare")
@errors_as_messages
def runs_compare(run_a: str, run_b: str, home: Optional[Path] = typer.Option(None, "--home")):
    """Final metrics of two runs side by side, with the difference."""
    store = _store(home)
    rows = store.compare(run_a, run_b)
    from attar.report import render_compare_table

    out.print(render_compare_table(rows, run_a, run_b))


def _mount_subapps() -> None:
    from attar.adapt.cli import app as finetune_app
    from attar.condense.cli import app as condense_app
    from attar.distill.lm_cli import app as lm_app
    from attar.select.cli import app as select_app

    app.add_typer(condense_app, name="condense")
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(lm_app, name="lm")
    app.add_typer(select_app, name="select")


_mount_merge()
_mount_subapps()


def main() -> None:
    """The ``attar`` command: the Typer app, with file-system refusals on a user's paths (an --out under a
    file, a read-only folder, a full disk) printed as one paragraph, whatever command hit them."""
    from attar.console import path_error

    try:
        app()
    except OSError as e:
        msg = path_error(e)
        if msg is None:
            raise
        try:
            _fail(msg)
        except typer.Exit as ex:
            sys.exit(ex.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
