"""`attar run`, `attar recipe-schema`, `attar convert-checkpoint`: recipes and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from attar.cli.app import THREADS_HELP, app, out, start_long_command
from attar.console import err as _err
from attar.console import fail as _fail
from attar.errors import AttarError


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
    tensorboard: bool = typer.Option(
        False, "--tensorboard",
        help="also write every stage's metrics as TensorBoard event files in runs/<id>/<stage>/tensorboard/ "
             "(`tensorboard --logdir runs/<id>`); needs `pip install 'attar[tensorboard]'`"),
):
    """Run a recipe's stages in order and write report.md / report.html.

    SIGTERM or Ctrl-C stops the run at the next training step with a checkpoint and marks it interrupted
    (exit code 143 or 130); `attar run --resume runs/<id>` continues it.
    """
    from attar.lifecycle import RunInterrupted, read_run_json
    from attar.pipeline import run_recipe
    from attar.recipe import builtin_recipe_path

    try:
        start_long_command(threads, quiet)
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
        run_dir = run_recipe(path, resume_dir=resume, home=home, allow_optim_change=allow_optim_change,
                             tensorboard=tensorboard)
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


