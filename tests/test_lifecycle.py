"""A run's lifetime as a user meets it: SIGTERM and Ctrl-C stop cleanly with a checkpoint and resume exactly,
a killed run shows as interrupted, a second resume of one run is refused, and the ways a run store, a runs
folder, a resume folder or a full disk go wrong end in one paragraph (exit 2), never a traceback."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import attar.io
from attar.cli import app
from attar.errors import AttarError
from attar.lifecycle import (LOCK_NAME, RunInterrupted, graceful_stop, lock_holder, lock_state, read_run_json, run_lock,
                             stop_on_signals, stop_requested)
from attar.store import RunStore

# Subprocesses and this process train with one thread each, so their weights can be compared bit for bit.
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ENV = {**os.environ, "CI": "true", "ATTAR_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

RECIPE = """\
name: lifecycle
seed: 5
data: {name: digits}
stages:
  - name: net
    kind: train
    model: {arch: mlp, hidden: [32]}
    train: {epochs: EPOCHS, batch_size: 16, lr: 0.003CKPT}
"""


def _recipe(tmp_path: Path, epochs: int = 2, checkpoint_every: int | None = None) -> Path:
    p = tmp_path / f"r{epochs}-{checkpoint_every}.yaml"
    ckpt = f", checkpoint_every: {checkpoint_every}" if checkpoint_every else ""
    p.write_text(RECIPE.replace("EPOCHS", str(epochs)).replace("CKPT", ckpt))
    return p


def _cli(*args, home: Path):
    return runner.invoke(app, [*args, "--home", str(home)])


def _run_dir(home: Path) -> Path:
    (d,) = [p for p in home.iterdir() if (p / "run.json").exists()]
    return d


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "net" / "model" / "model.safetensors")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _row(home: Path) -> dict:
    with RunStore(home / "runs.db") as s:
        (run,) = s.list_runs()
        run["stages"] = s.list_stages(run["id"])
    return run


def _one_paragraph(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    text = res.output.strip()
    assert text.startswith("error:") and "\n\n" not in text, text
    return _squash(text)


def _squash(text: str) -> str:
    """Without whitespace: rich wraps long messages anywhere, also inside paths at '-'."""
    return "".join(text.split())


@pytest.fixture(autouse=True)
def _same_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # `attar run` in this process applies it, like the subprocesses
    monkeypatch.setenv("ATTAR_PROGRESS", "0")


# ---------------------------------------------------------------- the lock


LOCKER = textwrap.dedent("""\
    import sys, time
    from attar.lifecycle import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    assert lock_state(tmp_path) is False  # no lock file: nobody runs here
    proc = _hold_lock(tmp_path)
    try:
        assert lock_state(tmp_path) is True
        assert lock_holder(tmp_path)["pid"] == proc.pid
        with pytest.raises(AttarError, match=f"in use by process {proc.pid} ") as e:
            with run_lock(tmp_path, wait_s=0.2):
                pass
        assert str(tmp_path / LOCK_NAME) in str(e.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the flock
        proc.wait()
    assert lock_state(tmp_path) is False and lock_holder(tmp_path) is None
    with run_lock(tmp_path) as info:
        assert info["pid"] == os.getpid() and lock_state(tmp_path) is True
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert lock_state(tmp_path) is False


def test_file_system_without_locks_runs_unguarded_and_is_never_marked(tmp_path, monkeypatch):
    import attar.lifecycle

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(attar.lifecycle.fcntl, "flock", no_locks)
    with RunStore(tmp_path / "runs.db") as s:
        rid = s.start_run("r", "", None, seed=0)
        (tmp_path / rid).mkdir()
        with run_lock(tmp_path / rid) as info:  # no refusal, no traceback
            assert info["pid"] == os.getpid()
        assert lock_state(tmp_path / rid) is None  # cannot be told...
        assert s.mark_gone_runs() == []  # ...so a running run is left running


def test_signals_stop_at_the_next_safe_point_or_at_once():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals():
        with pytest.raises(RunInterrupted) as e:  # no training loop polling: stop at once
            os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.exit_code == 143 and e.value.signal_name == "SIGTERM"
        with pytest.raises(RunInterrupted) as e:  # the loop ends with a request it never polled
            with graceful_stop():
                os.kill(os.getpid(), signal.SIGINT)
                assert stop_requested() == signal.SIGINT  # deferred to the loop, which would poll it
        assert e.value.exit_code == 130
        with pytest.raises(RunInterrupted):  # a second signal while one is pending: at once
            with graceful_stop():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
                pytest.fail("the second SIGTERM did not stop")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert stop_requested() is None


# ---------------------------------------------------------------- stopping and resuming a run


def test_ctrl_c_in_training_saves_a_checkpoint_there_and_resume_is_exact(tmp_path, monkeypatch):
    """Ctrl-C arrives at step 10 (checkpoint_every 25): the run stops at that step with a checkpoint of it,
    is recorded interrupted, and the resume ends with the weights of an uninterrupted run."""
    recipe = _recipe(tmp_path, epochs=2, checkpoint_every=25)
    assert _cli("run", str(recipe), home=tmp_path / "ref").exit_code == 0
    ref = _weights(_run_dir(tmp_path / "ref"))

    real = RunStore.log_metrics

    def ctrl_c_at_step_10(self, run_id, stage, step, values):
        real(self, run_id, stage, step, values)
        if stage == "net" and step == 10:
            os.kill(os.getpid(), signal.SIGINT)

    home = tmp_path / "home"
    with monkeypatch.context() as m:
        m.setattr(RunStore, "log_metrics", ctrl_c_at_step_10)
        res = _cli("run", str(recipe), home=home)
    run_dir = _run_dir(home)
    assert res.exit_code == 130, res.output
    assert f"Resume with: attar run --resume {run_dir} --home {home}" in " ".join(res.output.split())
    assert sorted(p.name for p in (run_dir / "net" / "checkpoints").iterdir()) == ["step-00000010"]
    row = _row(home)
    assert row["status"] == "interrupted" and "stopped by SIGINT" in row["error"]
    assert row["stages"][0]["status"] == "interrupted"
    assert lock_state(run_dir) is False

    res = _cli("run", "--resume", str(run_dir), home=home)
    assert res.exit_code == 0, res.output
    assert _row(home)["status"] == "done"
    _assert_same_weights(ref, _weights(run_dir))


def _wait_for_step(home: Path, step: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the run in ``home`` has logged training metrics at ``step`` (it is then inside the training loop)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (home / "runs.db").exists():
            try:
                with closing(sqlite3.connect(home / "runs.db", timeout=1)) as c:
                    if c.execute("SELECT 1 FROM metrics WHERE stage = 'net' AND step >= ?", (step,)).fetchone():
                        return
            except sqlite3.OperationalError:
                pass  # the schema is being created
        time.sleep(0.03)
    pytest.fail("the run did not reach the step in time")


def test_sigterm_saves_a_checkpoint_marks_interrupted_and_resume_is_exact(tmp_path):
    """SIGTERM to `attar run` in a training stage without periodic checkpoints: exit 143, one line saying how
    to resume, a checkpoint written on the way out (the only one), the store row interrupted, and the resume
    ends with exactly the weights of an uninterrupted run."""
    recipe = _recipe(tmp_path, epochs=8)
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-m", "attar.cli", "run", str(recipe), "--home", str(home)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(home, 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    run_dir = _run_dir(home)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert line.startswith("interrupted: stopped by SIGTERM") and line.endswith(
        f"Resume with: attar run --resume {run_dir} --home {home}")
    (ckpt,) = (run_dir / "net" / "checkpoints").iterdir()  # no periodic ones: this is the SIGTERM checkpoint
    assert (ckpt / "manifest.json").exists() and int(ckpt.name.split("-")[1]) >= 10 and str(ckpt) in line
    row = _row(home)
    assert row["status"] == "interrupted" and row["stages"][0]["status"] == "interrupted"

    assert _cli("run", str(recipe), home=tmp_path / "ref").exit_code == 0  # the same recipe, uninterrupted
    res = _cli("run", "--resume", str(run_dir), home=home)
    assert res.exit_code == 0, res.output
    _assert_same_weights(_weights(_run_dir(tmp_path / "ref")), _weights(run_dir))
    assert _row(home)["status"] == "done"


def test_sigkilled_run_shows_interrupted_and_resume_is_refused_while_running(tmp_path):
    """A run killed with SIGKILL cannot record anything; `runs list` finds its lock free and records it
    interrupted. While it still runs, it shows as running and a second process resuming it is refused."""
    recipe = _recipe(tmp_path, epochs=1000, checkpoint_every=20)  # far longer than the test: it is killed
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-m", "attar.cli", "run", str(recipe), "--home", str(home)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_step(home, 20, proc)
        run_dir = _run_dir(home)
        res = _cli("runs", "list", home=home)
        assert res.exit_code == 0 and "running" in res.output
        res = _cli("run", "--resume", str(run_dir), home=home)
        out = _one_paragraph(res)
        assert _squash(f"in use by process {proc.pid} ") in out and _squash(str(run_dir / LOCK_NAME)) in out
        assert _row(home)["status"] == "running"  # the refused resume touched nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _row(home)["status"] == "running"  # nobody recorded the kill...
    res = _cli("runs", "list", home=home)
    assert res.exit_code == 0 and "interrupted" in res.output and "running" not in res.output
    row = _row(home)  # ...until `runs list` found the lock free, and recorded it
    assert row["status"] == "interrupted" and row["stages"][0]["status"] == "interrupted"
    res = _cli("runs", "show", "latest", home=home)
    assert res.exit_code == 0 and "status=interrupted" in res.output
    assert "attar run --resume" in " ".join(res.output.split())


def test_concurrent_resume_is_refused_naming_the_pid(tmp_path):
    home = tmp_path / "home"
    assert _cli("run", str(_recipe(tmp_path, epochs=1)), home=home).exit_code == 0
    run_dir = _run_dir(home)
    before = _row(home)
    proc = _hold_lock(run_dir)  # another process resuming this run
    try:
        out = _one_paragraph(_cli("run", "--resume", str(run_dir), home=home))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _squash(f"The run folder {run_dir} is in use by process {proc.pid} ") in out
    after = _row(home)
    assert (after["status"], after["ended"]) == (before["status"], before["ended"])


def test_disk_full_while_writing_a_checkpoint(tmp_path, monkeypatch):
    """ENOSPC writing the step-20 checkpoint: one paragraph naming the file, exit 2, the step-10 checkpoint
    kept whole (no temporary leftovers), the run recorded failed; once there is space, the resume is exact."""
    recipe = _recipe(tmp_path, epochs=2, checkpoint_every=10)
    assert _cli("run", str(recipe), home=tmp_path / "ref").exit_code == 0

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    class FullDiskOs:  # attar.io's view of `os`: writes of the step-20 checkpoint fail
        def __getattr__(self, name):
            return getattr(os, name)

        def fdopen(self, fd, *args, **kwargs):
            f = os.fdopen(fd, *args, **kwargs)
            return FullFile(f) if "step-00000020" in os.readlink(f"/proc/self/fd/{fd}") else f

    home = tmp_path / "home"
    with monkeypatch.context() as m:
        m.setattr(attar.io, "os", FullDiskOs())
        res = _cli("run", str(recipe), home=home)
    out = _one_paragraph(res)
    run_dir = _run_dir(home)
    ckpts = run_dir / "net" / "checkpoints"
    assert _squash("No space left on the device while writing") in out and _squash(f"{ckpts}/.step-00000020.") in out
    assert _squash("last good checkpoint") in out and _squash(f"attar run --resume {run_dir}") in out
    assert [p.name for p in ckpts.iterdir()] == ["step-00000010"]
    assert (ckpts / "step-00000010" / "manifest.json").exists()
    row = _row(home)
    assert row["status"] == "failed" and "No space left" in row["error"]

    assert _cli("run", "--resume", str(run_dir), home=home).exit_code == 0
    _assert_same_weights(_weights(_run_dir(tmp_path / "ref")), _weights(run_dir))


# ---------------------------------------------------------------- bad runs folders, stores and resume folders


def _damage(db: Path, how: str) -> None:
    if how == "random bytes":
        db.write_bytes(os.urandom(8192))
    elif how == "text":
        db.write_text("these are my notes, not a database\n" * 50)
    else:  # truncated: the header survives, the pages it points to do not
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 3])
    for side in ("runs.db-wal", "runs.db-shm"):
        (db.parent / side).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def finished_home(tmp_path_factory):
    """A runs folder with one finished run (the store checkpointed into runs.db, no WAL left)."""
    home = tmp_path_factory.mktemp("finished")
    assert runner.invoke(app, ["run", str(_recipe(home, epochs=1)), "--home", str(home / "runs")]).exit_code == 0
    return home / "runs"


@pytest.mark.parametrize("how", ["random bytes", "text", "truncated"])
def test_damaged_store_is_one_paragraph_naming_it(tmp_path, finished_home, how):
    import shutil

    home = tmp_path / "runs"
    shutil.copytree(finished_home, home)
    run_id = _run_dir(home).name
    with closing(sqlite3.connect(home / "runs.db")) as c:  # enough rows that a truncation cuts real pages
        c.executemany("INSERT INTO metrics VALUES (?, 'net', ?, 'pad', 0)", [(run_id, i) for i in range(5000)])
        c.commit()
    _damage(home / "runs.db", how)
    for args in (["runs", "list"], ["runs", "show", "latest"], ["runs", "compare", run_id, run_id]):
        out = _one_paragraph(_cli(*args, home=home))
        assert _squash(f"The run store {home / 'runs.db'}") in out and _squash("Move it aside") in out, (args, out)
        assert _squash("run folders next to it") in out and _squash("stay intact") in out
    out = _one_paragraph(_cli("run", str(_recipe(tmp_path, epochs=1)), home=home))
    assert _squash(f"{home / 'runs.db'}") in out and _squash("Move it aside") in out
    assert len([p for p in home.iterdir() if p.is_dir()]) == 1  # no new run folder


def test_runs_folder_that_is_a_file(tmp_path, monkeypatch):
    f = tmp_path / "notes.txt"
    f.write_text("not a folder")
    monkeypatch.setenv("ATTAR_HOME", str(f))
    for args in (["runs", "list"], ["run", str(_recipe(tmp_path, epochs=1))]):
        out = _one_paragraph(runner.invoke(app, args))
        assert _squash(f"{f} is a file, not a folder") in out and _squash("ATTAR_HOME") in out, out
    out = _one_paragraph(runner.invoke(app, ["run", str(_recipe(tmp_path, epochs=1)), "--home", str(f / "sub")]))
    assert _squash(f"{f} is a file, not a folder") in out


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    home = tmp_path / "home"
    recipe = _recipe(tmp_path, epochs=1)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "recipe.yaml").write_text(recipe.read_text())  # looks like a run, but has no run.json
    for args in (["run", "--resume", str(plain)], ["run", str(recipe), "--resume", str(plain)]):
        out = _one_paragraph(_cli(*args, home=home))
        assert _squash(f"Cannot resume {plain}: it has no run.json") in out, out
    out = _one_paragraph(_cli("run", str(recipe), "--resume", str(tmp_path / "nowhere"), home=home))
    assert _squash("does not exist") in out
    (plain / "run.json").write_text("{not json")
    out = _one_paragraph(_cli("run", str(recipe), "--resume", str(plain), home=home))
    assert _squash("run.json cannot be read") in out
    assert not home.exists()
    with pytest.raises(AttarError, match="has no run_id"):
        (plain / "run.json").write_text("[]")
        read_run_json(plain)
