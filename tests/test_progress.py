"""Progress where output is not a terminal: plain lines at an interval, a final summary; --quiet: nothing."""

from __future__ import annotations

import io

import pytest
import torch
from typer.testing import CliRunner

from attar.train import progress as P
from attar.train.progress import StepProgress, progress_mode

pytestmark = pytest.mark.usefixtures("one_thread")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for k in ("CI", "ATTAR_PROGRESS", "ATTAR_PROGRESS_INTERVAL"):
        monkeypatch.delenv(k, raising=False)
    P.set_quiet(False)
    yield
    P.set_quiet(False)


def test_the_one_mode_check(monkeypatch):
    assert progress_mode(io.StringIO()) == "lines"  # a log file or pipe
    assert progress_mode(Tty()) == "bar"
    monkeypatch.setenv("CI", "true")
    assert progress_mode(Tty()) == "lines"  # CI consoles often claim to be terminals
    monkeypatch.setenv("CI", "false")
    assert progress_mode(Tty()) == "bar"
    assert progress_mode(Tty(), enabled=False) == "off"
    monkeypatch.setenv("ATTAR_PROGRESS", "0")
    assert progress_mode(io.StringIO()) == "off"
    monkeypatch.delenv("ATTAR_PROGRESS")
    P.set_quiet(True)
    assert progress_mode(io.StringIO()) == progress_mode(Tty()) == "off"


def test_lines_at_the_interval_and_a_final_summary():
    clock, out = Clock(), io.StringIO()
    with StepProgress("train student", 100, stream=out, interval=30, clock=clock) as bar:
        for i in range(100):
            clock.t += 1.0  # one step per second: a line at 30 s, 60 s and 90 s
            bar.update(1, loss=1.0 / (i + 1))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("train student: 30/100 steps (30%)") and "elapsed 30.0s" in lines[0] and "eta 1m10s" in lines[0]
    assert lines[1].startswith("train student: 60/100 steps (60%)") and "eta 40.0s" in lines[1]
    assert lines[2].startswith("train student: 90/100 steps (90%)")
    assert lines[3].startswith("train student: done, 100/100 steps in 1m40s") and "loss 0.01" in lines[3]


def test_a_resumed_loop_counts_from_where_it_was_and_a_failure_says_so():
    clock, out = Clock(), io.StringIO()
    with pytest.raises(RuntimeError):
        with StepProgress("t", 10, completed=6, stream=out, interval=0, clock=clock, unit="rows") as bar:
            clock.t += 2.0
            bar.update(2)
            raise RuntimeError("boom")
    first, last = out.getvalue().splitlines()
    assert first.startswith("t: 8/10 rows (80%)") and "eta 2.0s" in first  # 2 rows in 2 s since the resume
    assert last == "t: stopped (RuntimeError), 8/10 rows in 2.0s"


def test_quiet_and_disabled_print_nothing(monkeypatch):
    for kw in ({"enabled": False}, {}):
        P.set_quiet(not kw)
        out, clock = io.StringIO(), Clock()
        with StepProgress("x", 5, stream=out, interval=0, clock=clock, **kw) as bar:
            for _ in range(5):
                bar.update(1)
        assert out.getvalue() == ""


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("ATTAR_PROGRESS_INTERVAL", "5")
    assert StepProgress("x", 1, stream=io.StringIO()).interval == 5.0
    monkeypatch.setenv("ATTAR_PROGRESS_INTERVAL", "soon")
    assert StepProgress("x", 1, stream=io.StringIO()).interval == P.DEFAULT_INTERVAL


def test_trainer_and_teacher_pass_report_on_a_non_terminal(capsys, monkeypatch):
    """The real loops, with stderr captured (not a terminal) and every update due."""
    from attar.distill.teacher_cache import TeacherCache
    from attar.train.config import TrainConfig
    from attar.train.trainer import Trainer

    monkeypatch.setenv("ATTAR_PROGRESS_INTERVAL", "0")
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = torch.nn.Linear(5, 3)
    TeacherCache.build([model], x, batch_size=16)
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if ln.startswith("teacher pass (1 teacher): 16/64 rows (25%)")]
    assert err[-1].startswith("teacher pass (1 teacher): done, 64/64 rows in")

    from attar.distill.objectives import build_objective as objective

    Trainer(model, objective({"name": "ce"}), x, y, TrainConfig(epochs=2, batch_size=16), name="lin").fit()
    err = capsys.readouterr().err.splitlines()
    steps = [ln for ln in err if ln.startswith("lin: ") and "steps (" in ln]
    assert len(steps) == 8 and steps[0].startswith("lin: 1/8 steps (12%)  loss ")
    assert err[-1].startswith("lin: done, 8/8 steps in")


RECIPE = """\
name: quiet
data: {name: digits}
stages:
  - name: s
    kind: train
    model: {arch: mlp, hidden: [8]}
    train: {epochs: 1, batch_size: 256}
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_attar_run_summary_lines_and_quiet(tmp_path, quiet):
    from attar.cli import app

    (tmp_path / "r.yaml").write_text(RECIPE)
    before = torch.get_num_threads()
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.yaml"), "--home", str(tmp_path / "h"),
                                   *(["--quiet"] if quiet else [])], env={"CI": "true"})
    torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    summaries = [ln for ln in res.stderr.splitlines() if ln.startswith("s: done, ")]
    assert len(summaries) == (0 if quiet else 1), res.stderr
