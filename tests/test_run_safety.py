"""A recipe can only write and delete inside its own run folder; a resume continues exactly the recorded recipe."""

import json
import os

import pytest
from typer.testing import CliRunner

from attar.cli import app
from attar.errors import AttarError
from attar.paths import confined, remove_tree

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()

TINY = """\
name: tiny
seed: 1
data: {{name: digits}}
stages:
  - name: {name}
    kind: train
    model: {{arch: mlp, hidden: [{width}]}}
    train: {{epochs: {epochs}, batch_size: 64, lr: {lr}, checkpoint_every: 5}}
"""


def _recipe(tmp_path, name="first", width=8, epochs=1, lr=0.003, fname="r.yaml"):
    p = tmp_path / fname
    p.write_text(TINY.format(name=name, width=width, epochs=epochs, lr=lr))
    return p


def _run(tmp_path, recipe, *extra):
    return runner.invoke(app, ["run", str(recipe), "--home", str(tmp_path / "home"), *extra])


def _victim(tmp_path):
    victim = tmp_path / "victim"
    (victim / "model").mkdir(parents=True)
    (victim / "model" / "thesis.txt").write_text("four years of work")
    (victim / "checkpoints").mkdir()
    return victim


@pytest.mark.parametrize("name", ["ABS", "../victim", "..", "a/b", ".hidden", "x" * 65, ""])
def test_stage_names_that_are_paths_are_refused_at_load(tmp_path, name):
    victim = _victim(tmp_path)
    name = str(victim) if name == "ABS" else name
    res = _run(tmp_path, _recipe(tmp_path, name=json.dumps(name)))
    assert res.exit_code == 2, res.output
    assert "stages[0].name" in res.output and "folder name" in res.output
    assert (victim / "model" / "thesis.txt").read_text() == "four years of work"
    assert not (tmp_path / "home").exists()  # refused before any run folder or store row exists


def test_symlink_planted_in_the_run_folder_is_not_followed(tmp_path):
    res = _run(tmp_path, _recipe(tmp_path, epochs=2))
    assert res.exit_code == 0, res.output
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    victim = _victim(tmp_path)
    stage = run_dir / "first"
    os.rename(stage, tmp_path / "moved")
    stage.symlink_to(victim, target_is_directory=True)
    res = runner.invoke(app, ["run", "--resume", str(run_dir), "--home", str(tmp_path / "home")])
    assert res.exit_code == 2 and "symlink" in res.output, res.output
    assert (victim / "model" / "thesis.txt").exists() and (victim / "checkpoints").exists()


def test_confined_and_remove_tree_stay_inside_the_root(tmp_path):
    root, victim = tmp_path / "run", _victim(tmp_path)
    (root / "stage").mkdir(parents=True)
    (root / "stage" / "link").symlink_to(victim, target_is_directory=True)
    with pytest.raises(AttarError, match="outside"):
        confined(root, root / ".." / "victim")
    with pytest.raises(AttarError, match="outside"):
        confined(root, root / "stage" / "link" / "model")
    with pytest.raises(AttarError, match="outside"):
        remove_tree(victim / "checkpoints", root)
    with pytest.raises(AttarError, match="symlink"):
        remove_tree(root / "stage" / "link", root)
    assert (victim / "checkpoints").exists() and (victim / "model" / "thesis.txt").exists()
    remove_tree(root / "stage", root)
    assert not (root / "stage").exists() and (victim / "model" / "thesis.txt").exists()


def _killed_run(tmp_path):
    """A run whose only stage failed midway (lr 1e9 diverges): a resumable run folder with a checkpoint."""
    res = _run(tmp_path, _recipe(tmp_path, epochs=3, lr=1e9))
    assert res.exit_code == 2 and "loss became" in res.output, res.output
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    return run_dir


@pytest.mark.parametrize("change, field", [
    (dict(width=16), "stages[0].model.hidden"),
    (dict(name="second"), "stages[0].name"),
    (dict(epochs=4), "stages[0].train.epochs"),
])
def test_resume_with_a_changed_recipe_is_refused_with_a_diff(tmp_path, change, field):
    res = _run(tmp_path, _recipe(tmp_path, epochs=3))
    assert res.exit_code == 0
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    before = (run_dir / "recipe.yaml").read_text()
    changed = _recipe(tmp_path, **{"epochs": 3, **change}, fname="changed.yaml")
    for extra in ([], ["--allow-optim-change"]):
        res = _run(tmp_path, changed, "--resume", str(run_dir), *extra)
        assert res.exit_code == 2, res.output
        assert field in res.output and "differs from the one" in res.output
    assert (run_dir / "recipe.yaml").read_text() == before


def test_resume_takes_where_a_stage_runs_and_what_it_logs_and_records_it(tmp_path):
    """train.device and train.log_to change no weight: a resume accepts them without a flag and records them."""
    assert _run(tmp_path, _recipe(tmp_path, epochs=3)).exit_code == 0
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    changed = _recipe(tmp_path, epochs=3, fname="c.yaml")
    changed.write_text(changed.read_text().replace("checkpoint_every: 5}", "checkpoint_every: 5, device: cpu, "
                                                   "log_to: [tensorboard]}"))
    res = _run(tmp_path, changed, "--resume", str(run_dir))
    assert res.exit_code == 0, res.output
    meta = json.loads((run_dir / "run.json").read_text())
    fields = {c["field"] for c in meta["resumed_with_changes"][0]["changes"]}
    assert fields == {"stages[0].train.device", "stages[0].train.log_to"}
    assert "log_to: [tensorboard]" in (run_dir / "recipe.yaml").read_text()


def test_finished_stage_cannot_change_its_learning_rate(tmp_path):
    assert _run(tmp_path, _recipe(tmp_path)).exit_code == 0
    (run_dir,) = [p for p in (tmp_path / "home").iterdir() if (p / "run.json").exists()]
    res = _run(tmp_path, _recipe(tmp_path, lr=0.01, fname="c.yaml"), "--resume", str(run_dir), "--allow-optim-change")
    assert res.exit_code == 2 and "already finished" in res.output and "stages[0].train.lr" in res.output


def test_diverged_run_resumes_with_a_lower_lr_only_on_request_and_records_it(tmp_path):
    from attar.store import RunStore

    run_dir = _killed_run(tmp_path)
    lower = _recipe(tmp_path, epochs=3, lr=0.003, fname="lower.yaml")
    res = _run(tmp_path, lower, "--resume", str(run_dir))
    assert res.exit_code == 2 and "--allow-optim-change" in res.output and "stages[0].train.lr" in res.output
    res = _run(tmp_path, lower, "--resume", str(run_dir), "--allow-optim-change")
    assert res.exit_code == 0, res.output
    assert "lr: 0.003" in (run_dir / "recipe.yaml").read_text()
    meta = json.loads((run_dir / "run.json").read_text())
    (change,) = meta["resumed_with_changes"][0]["changes"]
    assert change == {"field": "stages[0].train.lr", "old": 1e9, "new": 0.003}
    with RunStore(tmp_path / "home" / "runs.db") as store:
        run = store.get_run(meta["run_id"])
    assert "lr: 0.003" in run["recipe"] and run["status"] == "done"


def test_resume_without_a_recipe_uses_the_runs_own(tmp_path):
    run_dir = _killed_run(tmp_path)
    res = runner.invoke(app, ["run", "--resume", str(run_dir), "--home", str(tmp_path / "home")])
    assert res.exit_code == 2 and "loss became" in res.output  # same recipe, same divergence: nothing changed


PREFLIGHT = """\
name: pf
data: {{name: digits}}
stages:
  - name: t
    kind: train
    model: {model}
    train: {{epochs: 1, batch_size: 64{train}}}
  - name: s
    kind: distill
    teacher: t
    model: {{arch: mlp, hidden: [8]}}
    objective: {objective}
    train: {{epochs: 1}}
"""


@pytest.mark.parametrize("model, train, objective, words", [
    ("{arch: nosuch}", "", "{name: kd}", ["stages[0].model", "Unknown architecture 'nosuch'"]),
    ("{arch: mlp, hidden: [8], args: {hiden: 3}}", "", "{name: kd}", ["stages[0].model", "'hiden'"]),
    ("{arch: mlp, hidden: [-4]}", "", "{name: kd}", ["stages[0].model", "-4"]),
    ("{arch: resnet, depth: 7}", "", "{name: kd}", ["stages[0].model", "6n+2"]),
    ("{arch: convnet, depth: 5}", "", "{name: kd}", ["stages[0].model", "too deep for 8x8", "depth <= 3"]),
    ("{arch: mlp, hidden: [8]}", ", augment: [rotate]", "{name: kd}", ["stages[0].train.augment", "'rotate'"]),
    ("{arch: mlp, hidden: [8]}", ", lr: .inf", "{name: kd}", ["stages[0].train.lr", "finite"]),
    ("{arch: mlp, hidden: [16]}", "", "{name: feature, student_layer: net.body.1, teacher_layer: nosuch.layer}",
     ["stages[1].objective", "'nosuch.layer'", "net.body.1"]),
])
def test_recipe_mistakes_fail_before_any_run_folder(tmp_path, model, train, objective, words):
    p = tmp_path / "r.yaml"
    p.write_text(PREFLIGHT.format(model=model, train=train, objective=objective))
    res = runner.invoke(app, ["run", str(p), "--home", str(tmp_path / "home")])
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert "Traceback" not in res.output and all(w in flat for w in words), res.output
    assert not (tmp_path / "home").exists()  # no run folder, no store row


def test_out_under_a_file_fails_before_work_with_a_paragraph(tmp_path):
    from attar.paths import check_out_dir

    (tmp_path / "F").write_text("not a folder")
    res = runner.invoke(app, ["condense", "--data", "digits", "--method", "random", "--ipc", "1",
                              "--out", str(tmp_path / "F" / "sub")])
    assert res.exit_code == 2 and "which is a file" in " ".join(res.output.split()), res.output
    with pytest.raises(AttarError, match="is a file"):
        check_out_dir(tmp_path / "F")
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_any_command_turns_a_refused_path_into_a_paragraph(tmp_path):
    """The `attar` entry point itself: a file-system refusal on a user's path is exit 2 and no traceback."""
    import subprocess
    import sys

    (tmp_path / "F").write_text("not a folder")
    res = subprocess.run([sys.executable, "-m", "attar.cli", "condense", "--data", "digits", "--method", "random",
                          "--ipc", "1", "--out", str(tmp_path / "o"), "--png", str(tmp_path / "F" / "x.png")],
                         capture_output=True, text=True, env={**os.environ, "CI": "true"})
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "cannot write" in res.stderr and str(tmp_path / "F") in res.stderr


REFS = """\
name: refs
data: {name: digits}
stages:
  - name: a
    kind: train
    model: {arch: mlp, hidden: [8]}
  - name: b
    kind: distill
    model: {arch: mlp, hidden: [8]}
    teacher: TEACHER
    init: INIT
"""


@pytest.mark.parametrize("teacher, init, line, field, words", [
    ("a", "b", 11, "stages[1].init", "names itself as its init"),
    ("b", "a", 10, "stages[1].teacher", "names itself as its teacher"),
    ("c", "a", 10, "stages[1].teacher", "refers to 'c', which is no stage"),
])
def test_reference_errors_point_at_the_stages_own_line(teacher, init, line, field, words):
    from attar.recipe import parse_recipe

    with pytest.raises(AttarError) as e:
        parse_recipe(REFS.replace("TEACHER", teacher).replace("INIT", init), "r.yaml")
    assert f"r.yaml, line {line}: field '{field}'" in str(e.value) and words in str(e.value)
