"""`attar runs export --mlflow`: a tiny run read back with MLflow's own client (params, metric histories with their
steps, artifacts, nesting), exported twice without duplicates; without mlflow, one paragraph and exit 2."""

import json
import sys

import pytest
from typer.testing import CliRunner

from attar.cli import app
from conftest import digits_kd_recipe
from attar.store import RunStore

runner = CliRunner()

RECIPE = digits_kd_recipe("tiny-export", seed=1, objective="{name: kd, temperature: 2, alpha: 0.3}")


def _export(home, uri, *extra):
    return runner.invoke(app, ["runs", "export", "--mlflow", "--tracking-uri", uri, "--home", str(home), *extra])


def test_export_to_mlflow_and_again(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'attar[mlflow]')")
    from mlflow import MlflowClient

    home = tmp_path / "home"
    (tmp_path / "r.yaml").write_text(RECIPE)
    res = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--home", str(home), "--quiet"])
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in home.iterdir() if (p / "run.json").exists()]
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    res = _export(home, uri)
    assert res.exit_code == 0, res.output
    assert f"{run_id}: exported with 2 stage run(s)" in res.output

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny-export")
    assert exp is not None and exp.artifact_location.startswith(str(tmp_path / "mlartifacts"))
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3
    (parent,) = [r for r in runs if "attar.stage" not in r.data.tags]
    stages = {r.data.tags["attar.stage"]: r for r in runs if "attar.stage" in r.data.tags}
    assert set(stages) == {"teacher", "student"}
    assert parent.data.tags["attar.run_id"] == run_id and parent.info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())

    # parameters: the recipe's top level on the parent, each stage's settings (defaults included) flattened
    assert parent.data.params["seed"] == "1" and parent.data.params["data.name"] == "digits"
    assert parent.data.params["stages"] == "teacher,student"
    t, s = stages["teacher"].data.params, stages["student"].data.params
    assert t["train.lr"] == "0.003" and t["model.arch"] == "mlp" and t["model.hidden"] == "[32]"
    assert t["train.schedule"] == "cosine" and s["objective.name"] == "kd" and s["teacher"] == "teacher"

    # metrics: every key the store recorded, with the same steps and values; final metrics on the parent
    with RunStore(home / "runs.db") as store:
        for name, r in stages.items():
            want = store.stage_metrics(run_id, name)
            assert {"train_loss", "lr", "samples_per_s", "val_accuracy", "test_accuracy"} <= set(want)
            assert set(r.data.metrics) == set(want)
            for key, points in want.items():
                got = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
                assert [st for st, _ in got] == [st for st, _ in points], (name, key)
                assert [v for _, v in got] == pytest.approx([v for _, v in points]), (name, key)
        final = store.final_metrics(run_id)
    assert parent.data.metrics["student.test_accuracy"] == pytest.approx(final["student"]["test_accuracy"])
    history = json.loads((run_dir / "teacher" / "history.json").read_text())
    steps = [m.step for m in client.get_metric_history(stages["teacher"].info.run_id, "val_accuracy")]
    assert sorted(steps) == [h["step"] for h in history]

    # artifacts: the report and recipe on the parent, each stage's model folder and history
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "learning_curves.png", "accuracy_vs_params.png", "recipe.yaml"} <= top
    for r in stages.values():
        assert {"model", "history.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
        files = {a.path for a in client.list_artifacts(r.info.run_id, "model")}
        assert {"model/model.safetensors", "model/state.json", "model/manifest.json"} <= files

    # again: found by its tags and skipped, so still one MLflow run per stage
    res = _export(home, uri, run_id[:10])
    assert res.exit_code == 0 and "already in MLflow, skipped" in res.output, res.output
    assert len(client.search_runs([exp.experiment_id])) == 3
    # a copy an interrupted export left incomplete (no attar.exported tag yet) is replaced, not doubled
    client.delete_tag(parent.info.run_id, "attar.exported")
    res = _export(home, uri)
    assert res.exit_code == 0 and "exported with 2 stage run(s)" in res.output, res.output
    again = client.search_runs([exp.experiment_id])
    assert len(again) == 3 and parent.info.run_id not in {r.info.run_id for r in again}


def test_default_tracking_uri(tmp_path, monkeypatch):
    from attar.store.mlflow_export import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert default_tracking_uri(tmp_path) == "http://tracking:5000"


def test_export_without_mlflow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    res = _export(tmp_path / "home", f"sqlite:///{tmp_path / 'm.db'}")
    text = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 2
    assert "pip install 'attar[mlflow]'" in text and "Traceback" not in text
    res = runner.invoke(app, ["runs", "export", "--home", str(tmp_path / "home")])
    assert res.exit_code == 2 and "--mlflow" in res.output
