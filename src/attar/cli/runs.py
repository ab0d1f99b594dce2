"""`attar runs list|show|compare|export`: the SQLite run store."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from attar.cli.app import app, out
from attar.console import errors_as_messages
from attar.errors import AttarError

runs_app = typer.Typer(no_args_is_help=True, help="The SQLite run store.")
app.add_typer(runs_app, name="runs")


def _store(home: Optional[Path]):
    """The run store, after recording runs whose process is gone (killed) as interrupted."""
    from attar.paths import home as runs_home
    from attar.store import DB_NAME, RunStore, check_home

    path = check_home(runs_home(home)) / DB_NAME
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


@runs_app.command("export")
@errors_as_messages
def runs_export(
    run_ids: Optional[List[str]] = typer.Argument(None, help="runs to export (ids, prefixes or latest); "
                                                             "default: every finished run"),
    mlflow: bool = typer.Option(False, "--mlflow", help="export to MLflow (needs `pip install 'attar[mlflow]'`)"),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow.db"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment; default: the recipe's name"),
    home: Optional[Path] = typer.Option(None, "--home"),
):
    """Copy runs into MLflow: a parent run per attar run, a nested run per stage, with params, metrics and
    artifacts. Exporting a run again skips it."""
    from attar.paths import home as runs_home
    from attar.store.mlflow_export import (
        MlflowExport,
        default_tracking_uri,
        export_runs,
        require_mlflow,
    )

    if not mlflow:
        raise AttarError("Name the target to export to: `attar runs export --mlflow` (the only one so far).")
    require_mlflow()  # before opening anything: one paragraph with the install command
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating its tables
    store = _store(home)
    opts = MlflowExport(tracking_uri=tracking_uri or default_tracking_uri(runs_home(home)), experiment=experiment)
    done = export_runs(store, list(run_ids or []), opts)
    if not done:
        out.print("No finished runs to export.")
    for e in done:
        what = "already in MLflow, skipped" if e.outcome == "skipped" else f"exported with {e.stages} stage run(s)"
        out.print(f"{e.run_id}: {what} (MLflow run {e.mlflow_run_id})", highlight=False, soft_wrap=True)
        for m in e.missing:
            out.print(f"  artifact no longer on disk, not copied: {m}", highlight=False, soft_wrap=True)
    out.print(f"tracking URI: {opts.tracking_uri}", highlight=False, soft_wrap=True)
