"""``attar condense``: the command-line face of :mod:`attar.condense`.

``app`` is a Typer group meant to be mounted as ``app.add_typer(condense_app, name="condense")``:

* ``attar condense --data fashion-mnist --method dm --ipc 10 --out DIR [--iterations N]`` condenses
  (the group's own callback, run when no sub-command is given);
* ``attar condense evaluate ARTIFACT`` runs the evaluation protocol and records it;
* ``attar condense show ARTIFACT --png grid.png`` renders the images.

``attar methods condense [NAME]`` lists the methods and their fields; ``--set FIELD=VALUE`` sets one.

Progress (:mod:`attar.train.progress`): a bar on a terminal, plain lines at an interval and a summary
otherwise (``CI``, a log file), nothing with ``--quiet``; ``--threads`` sets torch's CPU threads. Errors are
``AttarError``s, printed as one paragraph with exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from attar.cli.app import THREADS_HELP, parse_sets
from attar.console import fail as _fail
from attar.errors import AttarError
from attar.paths import check_out_dir
from attar.specs import CONDENSE_MODEL

app = typer.Typer(help="Condense a data set into a few synthetic images per class (dataset distillation).",
                  add_completion=False, invoke_without_command=True)
err = Console(stderr=True, highlight=False)


def start_command(quiet: bool, threads: Optional[int]) -> None:
    from attar.train.progress import start_command as start

    start(quiet, threads)


@app.callback()
def condense_cli(
    ctx: typer.Context,
    data: Optional[str] = typer.Option(None, "--data", help="built-in data set name (fashion-mnist, ...) or an image folder"),
    method: Optional[str] = typer.Option(None, "--method", help="random, herding, kcenter, dm, datadam, dc, dsa, mtt, rded, sre2l, cda, cvdd, ncfm (attar methods condense)"),
    ipc: Optional[int] = typer.Option(None, "--ipc", help="images per class"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="artifact folder to write (atomically)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="outer iterations (default: see --budget)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="wall-time budget, e.g. 10m, 90s, 1h30m (learned methods; "
                                         "on a CPU with no --iterations: 5m, a CPU budget)"),
    paper_schedule: bool = typer.Option(False, "--paper-schedule", help="the paper's iteration count (hours on a CPU)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when there is one) | cpu | cuda"),
    seed: int = typer.Option(0, "--seed"),
    init: str = typer.Option("real", "--init", help="real | noise (learned methods)"),
    width: Optional[int] = typer.Option(None, "--width", help=f"ConvNet width (default {CONDENSE_MODEL.width})"),
    depth: Optional[int] = typer.Option(None, "--depth", help=f"ConvNet depth (default {CONDENSE_MODEL.depth})"),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="a method field, FIELD=VALUE (repeatable), e.g. --set batch_real=64"),
    soft_labels: Optional[Path] = typer.Option(None, "--soft-labels", help="teacher model artifact for soft labels"),
    flip: bool = typer.Option(False, "--flip", help="FYI plug-in: match every synthetic image and its horizontal flip"),
    zca: bool = typer.Option(False, "--zca", help="ZCA plug-in: condense in ZCA-whitened space (stored unwhitened)"),
    zca_eps: float = typer.Option(0.1, "--zca-eps", help="ZCA regularisation"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="condense from at most this many rows"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    png: Optional[Path] = typer.Option(None, "--png", help="also render the images to this PNG"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, lines or summary"),
):
    """Condense --data into --ipc images per class with --method; writes a safetensors artifact to --out."""
    if ctx.invoked_subcommand is not None:
        return
    from attar.condense import condense, render_grid
    from attar.specs import DataSpec, ModelSpec

    missing = [f"--{k}" for k, v in (("data", data), ("method", method), ("ipc", ipc), ("out", out)) if v is None]
    if missing:
        _fail(AttarError(f"attar condense needs {', '.join(missing)} (or a sub-command: evaluate, show, methods)."))
    try:
        start_command(quiet, threads)
        if out is not None:
            check_out_dir(out)  # before hours of condensing, not after
        spec = DataSpec(imagefolder=data) if Path(data).is_dir() else DataSpec(name=data)
        if train_limit:
            spec = spec.model_copy(update={"train_limit": train_limit})
        model = ModelSpec(arch="convnet", width=width or CONDENSE_MODEL.width, depth=depth or CONDENSE_MODEL.depth)
        path = condense(spec, method, ipc, out, iterations, seed, model=model, init=init, params=parse_sets(sets),
                        soft_labels=soft_labels, flip=flip, zca=zca, zca_eps=zca_eps, overwrite=overwrite,
                        budget=budget, paper_schedule=paper_schedule, device=device,
                        log=(lambda s: None) if quiet else (lambda s: err.print(s, soft_wrap=True)))
        if png:
            render_grid(path, png)
    except AttarError as e:
        _fail(e)
    Console().print(f"condensed set: {path}")


@app.command("evaluate")
def evaluate_cli(
    artifact: Path = typer.Argument(..., help="folder written by attar condense"),
    nets: int = typer.Option(5, "--nets", help="freshly initialised networks per row"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="training epochs (default 1000 for sets of <= 256 rows)"),
    augment: str = typer.Option("dsa", "--augment", help="dsa | crop,flip | rrc:0.08,flip | none"),
    full_epochs: Optional[int] = typer.Option(None, "--full-epochs", help="epoch budget of the full-data reference "
                                              "(default: grows with the data; stops on a validation plateau; cached)"),
    full_patience: Optional[int] = typer.Option(None, "--full-patience", help="epochs without a better validation "
                                                "accuracy before the reference stops (0: never)"),
    no_random: bool = typer.Option(False, "--no-random", help="skip the random-subset row"),
    no_full: bool = typer.Option(False, "--no-full", help="skip the full-data row"),
    ranking: bool = typer.Option(False, "--ranking", help="also train without augmentation: DD-Ranking's "
                                 "augmentation-robust score (the label-robust score is always shown when it can be)"),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="score on a stratified subset of the test split"),
    relabel: str = typer.Option("stored", "--relabel", help="stored: one soft label per image; per-crop: the artifact's "
                                "teacher labels every augmented batch (SRe²L's FKD-style relabelling), the equal-label "
                                "random control too"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, lines or summaries"),
):
    """Train fresh networks on ARTIFACT, beside a random real subset of equal size and the full data."""
    from attar.condense import evaluate_condensed, format_evaluation

    try:
        start_command(quiet, threads)
        r = evaluate_condensed(artifact, nets=nets, epochs=epochs, augment=augment, seed=seed,
                               compare_random=not no_random, full_data=not no_full, full_epochs=full_epochs,
                               full_patience=full_patience, ranking=ranking, relabel=relabel.replace("-", "_"),
                               test_limit=test_limit, log=err.print)
    except AttarError as e:
        _fail(e)
    Console().print(format_evaluation(r))
    Console().print(f"recorded: {artifact / 'evaluation.json'}")


@app.command("show")
def show_cli(artifact: Path = typer.Argument(...), png: Path = typer.Option(..., "--png"),
             max_per_class: int = typer.Option(10, "--max-per-class")):
    """Render ARTIFACT's images as a PNG grid (one row per class)."""
    from attar.condense import render_grid

    try:
        Console().print(f"wrote {render_grid(artifact, png, max_per_class)}")
    except AttarError as e:
        _fail(e)
