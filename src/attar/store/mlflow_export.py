"""Copy runs from attar's run store into MLflow (`attar runs export --mlflow`).

The layout in MLflow: one experiment per recipe name (or ``--experiment``); per attar run a parent MLflow run
with the recipe's top-level settings as parameters, every stage's final metrics as ``<stage>.<metric>``, and the
report (``report.md``, ``report.html``, its figures), ``recipe.yaml`` and ``run.json`` as artifacts; under it one
nested run per stage with the stage's settings as flattened parameters (``train.lr``, ``model.arch``, ...), every
metric the store recorded at its step (losses, learning rate, throughput, validation and test metrics) and the
stage's artifacts (its model folder or condensed data set, ``history.json``).

Each MLflow run carries the tags ``attar.run_id`` and ``attar.stage``, and ``attar.exported`` once it is complete,
so exporting a run again finds the complete copy and skips it; a copy an interrupted export left half-written is
deleted and written again. ``mlflow`` is an optional extra (``pip install 'attar[mlflow]'``).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from attar.errors import AttarError
from attar.store import RunStore

INSTALL = "pip install 'attar[mlflow]'"
ENV_URI = "MLFLOW_TRACKING_URI"
_STATUS = {"done": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_PARAM_VALUE_MAX = 6000  # MLflow refuses longer parameter values
_KEY = re.compile(r"[^\w\-. /]")  # characters MLflow accepts in parameter and metric names


class MlflowExport(BaseModel):
    """Where and how `attar runs export --mlflow` writes."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str = Field(description="MLflow tracking URI, e.g. sqlite:///runs/mlflow.db or http://host:5000")
    experiment: str | None = Field(None, description="MLflow experiment; default: each run's recipe name")
    artifact_location: str | None = Field(
        None, description="artifact root of experiments this export creates; default: `mlartifacts/` next to a "
                          "SQLite tracking file, else the tracking server's own default")


class Exported(BaseModel):
    """One attar run's outcome: ``exported`` (with its MLflow parent run id) or ``skipped`` (already there)."""

    run_id: str
    outcome: str
    mlflow_run_id: str
    stages: int
    missing: list[str] = Field(default_factory=list, description="artifact paths that no longer exist")


def default_tracking_uri(home: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` when set, else a SQLite file ``mlflow.db`` next to attar's own ``runs.db``."""
    return os.environ.get(ENV_URI) or f"sqlite:///{home.resolve() / 'mlflow.db'}"


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        raise AttarError(
            f"Exporting to MLflow needs the `mlflow` package, which is not installed ({e}). Install it with "
            f"`{INSTALL}` (the MLflow client and its SQLite store; the full `pip install mlflow` works too) and run "
            "the export again. attar's own run store is unchanged."
        ) from None


def export_runs(store: RunStore, refs: list[str], opts: MlflowExport) -> list[Exported]:
    """Export the runs ``refs`` name (ids, prefixes or ``latest``), or every finished run when ``refs`` is empty."""
    require_mlflow()
    from mlflow import MlflowClient

    if refs:
        ids = [store.resolve_run_id(r) for r in refs]
        running = [i for i in ids if store.get_run(i)["status"] == "running"]
        if running:
            raise AttarError(f"Run(s) {', '.join(running)} are still running; export them once they have finished.")
    else:
        ids = [r["id"] for r in reversed(store.list_runs(limit=None)) if r["status"] == "done"]
    client = MlflowClient(tracking_uri=opts.tracking_uri)
    return [_export_run(client, store, rid, opts) for rid in ids]


# ---------------------------------------------------------------- one run


def _export_run(client, store: RunStore, run_id: str, opts: MlflowExport) -> Exported:
    from mlflow.entities import Metric

    run = store.get_run(run_id)
    exp_id = _experiment(client, opts.experiment or run["name"], opts)
    found = client.search_runs([exp_id], f"tags.`attar.run_id` = '{run_id}'", max_results=1000)
    parent = next((r for r in found if r.data.tags.get("attar.stage") is None), None)
    if parent is not None and parent.data.tags.get("attar.exported") == "true":
        return Exported(run_id=run_id, outcome="skipped", mlflow_run_id=parent.info.run_id, stages=len(found) - 1)
    for r in found:  # an export that stopped half-way: start this run's copy again
        client.delete_run(r.info.run_id)

    tags = {"attar.run_id": run_id, "attar.recipe": run["name"], "attar.status": run["status"],
            "mlflow.runName": f"{run['name']} {run_id}"}
    if run.get("git_commit"):
        tags["mlflow.source.git.commit"] = run["git_commit"]
    top = {k: v for k, v in (yaml.safe_load(run["recipe"]) or {}).items() if k != "stages"}
    top["stages"] = ",".join(s["name"] for s in run["stages"])
    p_id = _new_run(client, exp_id, tags, _ms(run["started"]), top)
    finals = store.final_metrics(run_id)
    stamp = _ms(run["started"])
    client.log_batch(p_id, metrics=[Metric(_key(f"{stage}.{k}"), v, stamp, 0) for stage, ms in finals.items()
                                    for k, v in ms.items() if stage])
    _log_metrics(client, p_id, store.stage_metrics(run_id, None), stamp)  # run-level metrics, if any
    run_dir = Path(run["run_dir"] or store.path.parent / run_id)
    missing: list[str] = []
    files = [a["path"] for a in run["artifacts"] if not a["stage"]] + [str(run_dir / "recipe.yaml"),
                                                                       str(run_dir / "run.json")]
    _log_artifacts(client, p_id, files, None, missing)

    for st in run["stages"]:
        s_tags = {"attar.run_id": run_id, "attar.stage": st["name"], "attar.kind": st["kind"],
                  "attar.status": st["status"], "mlflow.parentRunId": p_id, "mlflow.runName": st["name"]}
        s_id = _new_run(client, exp_id, s_tags, _ms(st["started"]), st["params"])
        _log_metrics(client, s_id, store.stage_metrics(run_id, st["name"]), _ms(st["started"]))
        for a in store.list_artifacts(run_id, st["name"]):
            _log_artifacts(client, s_id, [a["path"]], a["name"], missing)
        _log_artifacts(client, s_id, [str(run_dir / st["name"] / "history.json")], None, [])
        _close(client, s_id, st["status"], st.get("ended"))
    _close(client, p_id, run["status"], run.get("ended"))
    return Exported(run_id=run_id, outcome="exported", mlflow_run_id=p_id, stages=len(run["stages"]), missing=missing)


def _experiment(client, name: str, opts: MlflowExport) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    where = opts.artifact_location
    if where is None and opts.tracking_uri.startswith("sqlite:///"):
        db = Path(opts.tracking_uri.removeprefix("sqlite:///"))
        # MLflow's own default would be ./mlruns under whatever folder the command ran in
        where = str((db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", name)).resolve())
    return client.create_experiment(name, artifact_location=where)


def _new_run(client, exp_id: str, tags: dict[str, str], start_ms: int | None, params: dict) -> str:
    from mlflow.entities import Param

    rid = client.create_run(exp_id, start_time=start_ms, tags=tags).info.run_id
    flat = [Param(k, v) for k, v in _flatten(params).items()]
    for i in range(0, len(flat), 100):  # MLflow takes at most 100 parameters per call
        client.log_batch(rid, params=flat[i:i + 100])
    return rid


def _log_metrics(client, rid: str, curves: dict[str, list[tuple[int, float]]], stamp: int | None) -> None:
    from mlflow.entities import Metric

    points = [Metric(_key(k), v, stamp or 0, step) for k, pts in curves.items() for step, v in pts]
    for i in range(0, len(points), 1000):  # and at most 1000 metric values
        client.log_batch(rid, metrics=points[i:i + 1000])


def _log_artifacts(client, rid: str, paths: list[str], name: str | None, missing: list[str]) -> None:
    for p in map(Path, paths):
        if p.is_dir():
            client.log_artifacts(rid, str(p), artifact_path=name or p.name)
        elif p.is_file():
            client.log_artifact(rid, str(p))
        else:
            missing.append(str(p))


def _close(client, rid: str, status: str, ended: str | None) -> None:
    client.set_tag(rid, "attar.exported", "true")
    client.set_terminated(rid, status=_STATUS.get(status, "FINISHED"), end_time=_ms(ended))


# ---------------------------------------------------------------- values


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}, "augment": ["crop"]}`` -> ``{"train.lr": "0.1", "augment": '["crop"]'}``;
    lists of mappings are numbered (``teacher.0.arch``), other lists stay one JSON value."""
    if isinstance(obj, dict) and obj:
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    text = obj if isinstance(obj, str) else json.dumps(obj, default=str)
    return {_key(prefix): text[:_PARAM_VALUE_MAX]}


def _key(name: str) -> str:
    return _KEY.sub("_", name)


def _ms(when: str | None) -> int | None:
    """Milliseconds since the epoch of a store timestamp (ISO 8601), as MLflow counts time."""
    return int(datetime.fromisoformat(when).timestamp() * 1000) if when else None
