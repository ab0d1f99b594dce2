"""The CLI as a user runs it: a tiny recipe end to end, the run store commands, and bad inputs."""

import json

import pytest
import torch
from typer.testing import CliRunner

from attar.cli import app

runner = CliRunner()

RECIPE = """\
name: tiny
seed: 1
data: {name: digits}
stages:
  - name: teacher
    kind: train
    model: {arch: mlp, hidden: [64]}
    train: {epochs: 4, batch_size: 64, lr: 0.003}
  - name: student
    kind: distill
    teacher: teacher
    model: {arch: mlp, hidden: [8]}
    objective: {name: kd, divergence: js, temperature: 2, alpha: 0.3}
    train: {epochs: 4, batch_size: 64, lr: 0.003}
"""


def _run(tmp_path, text, *extra):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return runner.invoke(app, ["run", str(p), "--home", str(tmp_path / "home"), *extra])


def test_end_to_end_run_store_and_report(tmp_path):
    res = _run(tmp_path, RECIPE)
    assert res.exit_code == 0, res.output
    home = tmp_path / "home"
    (run_dir,) = [p for p in home.iterdir() if (p / "run.json").exists()]
    for f in ("report.md", "report.html", "learning_curves.png", "accuracy_vs_params.png",
              "teacher/model/model.safetensors", "student/model/manifest.json"):
        assert (run_dir / f).exists(), f
    md = (run_dir / "report.md").read_text()
    assert "| teacher |" in md and "| student |" in md
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]

    res = runner.invoke(app, ["runs", "list", "--home", str(home)])
    assert res.exit_code == 0 and run_id[:8] in res.output
    res = runner.invoke(app, ["runs", "show", run_id[:13], "--home", str(home)])
    assert res.exit_code == 0 and "test_accuracy" in res.output
    # A second run with another seed, then compare.
    assert _run(tmp_path, RECIPE.replace("seed: 1", "seed: 2")).exit_code == 0
    ids = [json.loads((p / "run.json").read_text())["run_id"] for p in home.iterdir() if (p / "run.json").exists()]
    res = runner.invoke(app, ["runs", "compare", *ids, "--home", str(home)])
    assert res.exit_code == 0 and "test_accuracy" in res.output

    # The distilled student artifact loads and scores like the report says.
    from attar.data import load_data
    from attar.models import load_model
    from attar.specs import DataSpec
    from attar.store import RunStore

    model, info = load_model(run_dir / "student" / "model")
    b = load_data(DataSpec(name="digits"))
    acc = (model.eval()(b.test.x).argmax(1) == b.test.y).float().mean().item()
    with RunStore(home / "runs.db") as st:
        logged = st.final_metrics(run_id)["student"]["test_accuracy"]
    assert abs(acc - logged) < 1e-6 and acc > 0.5


@pytest.mark.parametrize(
    "mutate,words",
    [
        (lambda r: r.replace("kind: distill", "kind: distil"), ["unknown stage kind 'distil'", "distill, evaluate"]),
        (lambda r: r.replace("name: kd,", "name: kdd,"), ["Unknown objective 'kdd'", "label_free"]),
        (lambda r: r.replace("divergence: js", "divergence: jsd"), ["jsd", "reverse_kl"]),
        (lambda r: r.replace("epochs: 4, batch_size: 64, lr: 0.003}\n  - name", "epochs: four}\n  - name"),
         ["line 8", "stages[0].train.epochs"]),
        (lambda r: r.replace("    kind: train\n", ""), ["stages[0].kind", "required field is missing"]),
        (lambda r: r.replace("teacher: teacher", "teacher: {pretrained: mnist-cnn}"), ["takes 1x28x28 images", "(1, 8, 8)"]),
    ],
)
def test_bad_recipes_fail_cleanly_and_leave_nothing(tmp_path, mutate, words):
    res = _run(tmp_path, mutate(RECIPE))
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    for w in words:
        assert w in out, out
    assert "Traceback" not in res.output
    home = tmp_path / "home"
    assert not home.exists() or not any(p.is_dir() and p.name != "cache" for p in home.iterdir())


def _csv(path, n_classes, rows=60):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.random((rows, 16)), columns=[f"f{i}" for i in range(16)])
    df["label"] = np.arange(rows) % n_classes
    df.to_csv(path, index=False)


def test_teacher_with_other_class_count_is_refused(tmp_path):
    _csv(tmp_path / "three.csv", 3)
    _csv(tmp_path / "ten.csv", 10, rows=100)
    first = RECIPE.split("  - name: student")[0].replace("{name: digits}", "{csv: %s}" % (tmp_path / "three.csv"))
    assert _run(tmp_path, first).exit_code == 0
    (model_dir,) = (tmp_path / "home").glob("*/teacher/model")
    bad = RECIPE.replace("teacher: teacher", f"teacher: {{artifact: {model_dir}}}")
    res = _run(tmp_path, bad.replace("{name: digits}", "{csv: %s}" % (tmp_path / "ten.csv")))
    assert res.exit_code == 2
    assert "predicts 3 classes but the stage's data has 10" in " ".join(res.output.split())
    res = _run(tmp_path, bad)  # digits: 1x8x8 images, where the teacher was trained on 16 table columns
    assert res.exit_code == 2
    assert "takes inputs of shape (16,)" in " ".join(res.output.split())


def test_data_list_and_methods():
    res = runner.invoke(app, ["data", "list"])
    assert res.exit_code == 0 and "fashion-mnist" in res.output and "digits" in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("kd", "pskd", "dho", "sinkhorn_batch", "convnet", "mnist-cnn"):
        assert name in res.output


def test_convert_checkpoint_and_pickle_refusal(tmp_path):
    from attar.checkpoint import load_safetensors

    torch.save({"w": torch.ones(2)}, tmp_path / "m.pth")
    res = runner.invoke(app, ["convert-checkpoint", str(tmp_path / "m.pth"), str(tmp_path / "m.safetensors")])
    assert res.exit_code == 0
    assert torch.equal(load_safetensors(tmp_path / "m.safetensors")["w"], torch.ones(2))


def test_damaged_artifact_and_empty_image_folder_are_reported(tmp_path):
    assert _run(tmp_path, RECIPE.split("  - name: student")[0]).exit_code == 0
    (model_dir,) = (tmp_path / "home").glob("*/teacher/model")
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    res = _run(tmp_path, RECIPE.replace("teacher: teacher", f"teacher: {{artifact: {model_dir}}}"))
    assert res.exit_code == 2 and "does not match its manifest" in " ".join(res.output.split())
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"not a png")
    res = _run(tmp_path, RECIPE.replace("{name: digits}", "{imagefolder: %s}" % (tmp_path / "imgs")))
    assert res.exit_code == 2 and "broken.png" in res.output
