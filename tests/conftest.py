"""Shared test fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Convert the small packaged LM (SmolLM2-135M) into ``runs/models`` once, before collection: the tests that
    read its real tokenizer and config (cross-tokenizer KD, vocabulary-aligned and LM merges, the served teacher)
    then run wherever `make setup` installed it, CI's clean clone included, instead of skipping there. In a
    subprocess: the conversion's gigabyte of freed heap would stay resident here and hide the peak-memory tests'
    growth."""
    if (ROOT / "runs" / "models" / "smollm2-135m" / "tokenizer.json").is_file():
        return
    code = ("from attar.text.pretrained_lm import ensure_converted; "
            f"ensure_converted('smollm2-135m', progress=False, home={str(ROOT / 'runs')!r})")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:  # not installed: the tests that need it skip, saying why
        print("conftest: SmolLM2-135M is not converted; the tests that need its files skip. "
              + (res.stderr.strip().splitlines() or [""])[-1])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared 2-core CI machine this avoids oversubscription
    (measured several times faster). Opt-in (``pytestmark = pytest.mark.usefixtures("one_thread")``) because
    tests that compare against a subprocess's weights must use the same thread count as that subprocess."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory):
    """A tiny random BERT folder (``bert/``) and a 180-row two-class CSV (``t.csv``) it can learn in a few steps."""
    import pandas as pd

    from attar.text.tiny import make_tiny_bert

    root = tmp_path_factory.mktemp("sentiment")
    make_tiny_bert(root / "bert", hidden=32, layers=1, intermediate=64)
    words = {"pos": ["love", "great", "good"], "neg": ["hate", "terrible", "bad"]}
    rows = [(f"i {words[c][i % 3]} self driving cars", c) for i in range(90) for c in ("pos", "neg")]
    pd.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}).to_csv(root / "t.csv", index=False)
    return root


def digits_kd_recipe(name: str, seed: int = 0, teacher_epochs: int = 2, teacher_extra: str = "",
                     objective: str = "") -> str:
    """A two-stage recipe on digits (MLP teacher, then a smaller distilled student) that runs in seconds."""
    return f"""\
name: {name}
seed: {seed}
data: {{name: digits}}
stages:
  - name: teacher
    kind: train
    model: {{arch: mlp, hidden: [32]}}
    train: {{epochs: {teacher_epochs}, batch_size: 64, lr: 0.003{teacher_extra}}}
  - name: student
    kind: distill
    teacher: teacher
    model: {{arch: mlp, hidden: [8]}}
{f"    objective: {objective}" + chr(10) if objective else ""}    train: {{epochs: 2, batch_size: 64, lr: 0.003}}
"""
