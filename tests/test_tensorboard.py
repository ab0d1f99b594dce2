"""TensorBoard logging (`train.log_to: [tensorboard]`, `attar run --tensorboard`): the event files hold the metrics
the run store recorded, tag for tag and step for step; without the package, the run is refused before it starts."""

import json
import sys

import pytest
from typer.testing import CliRunner

from attar.cli import app
from conftest import digits_kd_recipe
from attar.store import RunStore

runner = CliRunner()

RECIPE = digits_kd_recipe("tb", teacher_epochs=3, teacher_extra=", log_to: [tensorboard]")


def _run(tmp_path, text, *extra):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return runner.invoke(app, ["run", str(p), "--home", str(tmp_path / "home"), "--quiet", *extra])


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_log_to_tensorboard_writes_the_recorded_history(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'attar[tensorboard]')")
    res = _run(tmp_path, RECIPE)
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert not (run_dir / "student" / "tensorboard").exists()  # only the stage that asked
    got = _scalars(run_dir / "teacher" / "tensorboard")
    with RunStore(tmp_path / "home" / "runs.db") as store:
        want = store.stage_metrics(run_id, "teacher")
    # losses, learning rate, throughput, the epoch's validation metrics and the final test metrics
    for tag in ("train_loss", "lr", "samples_per_s", "val_accuracy", "val_nll", "test_accuracy", "test_nll", "epoch"):
        assert tag in got, (tag, sorted(got))
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    # the epoch records of history.json are there at their steps
    history = json.loads((run_dir / "teacher" / "history.json").read_text())
    assert [s for s, _ in got["val_accuracy"]] == [h["step"] for h in history]
    assert [v for _, v in got["val_accuracy"]] == pytest.approx([h["val_accuracy"] for h in history], rel=1e-6)


def test_tensorboard_flag_logs_every_stage(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'attar[tensorboard]')")
    one = RECIPE.split("  - name: student")[0].replace(", log_to: [tensorboard]", "").replace("epochs: 3", "epochs: 1")
    res = _run(tmp_path, one, "--tensorboard")
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    got = _scalars(run_dir / "teacher" / "tensorboard")
    assert {"train_loss", "lr", "val_accuracy", "test_accuracy"} <= set(got)


def test_missing_tensorboard_is_refused_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now raises ImportError
    res = _run(tmp_path, RECIPE)
    text = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 2
    assert "pip install 'attar[tensorboard]'" in text and "log_to" in text and "Traceback" not in text
    home = tmp_path / "home"
    assert not home.exists() or not [p for p in home.iterdir() if (p / "run.json").exists()]
