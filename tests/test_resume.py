"""Resume after SIGKILL ends with exactly the weights of an uninterrupted run (user-level, via the CLI)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

RECIPE = """\
name: resume-test
seed: 3
data: {name: fashion-mnist, train_limit: 4000}
stages:
  - name: teacher
    kind: train
    model: {arch: convnet, width: 8, depth: 2}
    train: {epochs: 2, batch_size: 32, checkpoint_every: 7, augment: [crop, flip]}
  - name: student
    kind: distill
    teacher: teacher
    model: {arch: mlp, hidden: [32]}
    objective: {name: kd, temperature: 2, alpha: 0.5}
    train: {epochs: 2, batch_size: 32, checkpoint_every: 7}
"""

ENV = {**os.environ, "CI": "true", "ATTAR_PROGRESS": "0"}


def _attar(*args, home):
    return [sys.executable, "-m", "attar.cli", *args, "--home", str(home)]


def _final_weights(run_dir: Path) -> dict:
    return {s: load_file(run_dir / s / "model" / "model.safetensors") for s in ("teacher", "student")}


def _run_dir(home: Path) -> Path:
    dirs = [p for p in home.iterdir() if (p / "run.json").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    ref_home, home = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_attar("run", str(recipe), home=ref_home), check=True, env=ENV, capture_output=True)
    ref = _final_weights(_run_dir(ref_home))

    proc = subprocess.Popen(_attar("run", str(recipe), home=home), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(home.glob("*/teacher/checkpoints/step-*/manifest.json"))
        if any(int(p.parent.name.split("-")[1]) >= 14 for p in ckpts):
            proc.send_signal(signal.SIGKILL)  # mid-epoch: 4000*0.9/32 = 112 steps per epoch
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    assert killed, "the run finished before it could be killed; the test needs a longer run"
    run_dir = _run_dir(home)
    assert not (run_dir / "teacher" / "model").exists()

    res = subprocess.run(_attar("run", "--resume", str(run_dir), home=home), env=ENV,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = _final_weights(run_dir)
    for stage in ref:
        assert ref[stage].keys() == got[stage].keys()
        for k in ref[stage]:
            assert torch.equal(ref[stage][k], got[stage][k]), f"{stage}/{k} differs after resume"
