"""Every artifact honours the user's umask (files 0666 & ~umask, folders 0777 & ~umask).

Temp files from mkstemp (0600) and folders from mkdtemp (0700) keep their private mode when renamed
into place; a colleague sharing the runs folder then got "Permission denied" on reports and models.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
UMASKS = [0o022, 0o002]

RECIPE = """\
name: modes
data: {name: digits}
stages:
  - name: teacher
    kind: train
    model: {arch: mlp, hidden: [16]}
    train: {epochs: 1, batch_size: 128}
  - name: student
    kind: distill
    teacher: teacher
    model: {arch: mlp, hidden: [8]}
    objective: {name: kd, temperature: 2.0}
    train: {epochs: 1, batch_size: 128, teacher_cache: "on"}
"""


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _bad_modes(root: Path, umask: int, skip=()) -> list[str]:
    """Every file and folder under ``root`` (itself included) whose mode is not the umask's."""
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    bad = []
    for p in [root, *root.rglob("*")]:
        if p.name in skip:
            continue
        want = want_dir if p.is_dir() else want_file
        if _mode(p) != want:
            bad.append(f"{p.relative_to(root.parent)} {_mode(p):o} (want {want:o})")
    return bad


def test_a_pipeline_run_writes_every_artifact_with_the_umask(tmp_path, umask):
    from attar.pipeline import run_recipe

    (tmp_path / "r.yaml").write_text(RECIPE)
    home = tmp_path / "home"
    run_dir = run_recipe(tmp_path / "r.yaml", home=home)
    names = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    # the artifacts the issue names are really there, so the walk below covers them
    for want in ("report.md", "report.html", "run.json", "teacher/history.json", "student/model/model.safetensors",
                 "student/model/state.json", "student/model/manifest.json"):
        assert want in names, sorted(names)
    caches = list((home / "cache").glob("teacher-*.safetensors"))
    assert caches, "the distill stage should have written a teacher cache"
    assert _bad_modes(run_dir, umask) == []
    assert _bad_modes(home / "cache", umask) == []


def test_shared_writers_follow_the_umask(tmp_path, umask):
    from attar.checkpoint import atomic_save_safetensors, atomic_write_bytes, make_temp_dir, make_temp_file, write_checkpoint
    from attar.report import write_report

    atomic_write_bytes(tmp_path / "a" / "x.bin", b"1")
    atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "a" / "w.safetensors")
    write_checkpoint(tmp_path / "ck", {"model": {"w": torch.ones(2)}}, {"step": 1})
    write_report(tmp_path / "rep", "t", [{"stage": "s", "accuracy": 0.5, "params": 10}],
                 {"s": {"train_loss": [(1, 1.0), (2, 0.5)]}})
    fd, f = make_temp_file(tmp_path, ".f.")
    os.close(fd)
    d = make_temp_dir(tmp_path, ".d.")
    assert _mode(f) == 0o666 & ~umask and _mode(d) == 0o777 & ~umask
    for root in ("a", "ck", "rep"):
        assert _bad_modes(tmp_path / root, umask) == []


def test_merge_output_and_lm_out_folders_follow_the_umask(tmp_path, umask):
    from attar.cli.lm import _staged
    from attar.merge.writer import ShardWriter

    with ShardWriter(tmp_path / "merged", [("w", (2,), torch.float32)], fmt="safetensors") as w:
        w.write("w", torch.ones(2))
        w.commit()
    with _staged(tmp_path / "lm", overwrite=False) as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert _bad_modes(tmp_path / "merged", umask) == []
    assert _bad_modes(tmp_path / "lm", umask) == []


def test_hf_model_and_peft_adapter_folders_follow_the_umask(tmp_path, umask, sentiment_files):
    from attar.adapt import build_adapter, merge_adapters
    from attar.adapt.peft_format import export_peft
    from attar.text.charlm import make_byte_lm
    from attar.text.hf import load_hf_classifier, save_hf_classifier

    model = load_hf_classifier(sentiment_files / "bert", num_classes=2)
    build_adapter({"name": "lora", "rank": 2, "targets": ["query"]}).apply(model, None, 0)
    export_peft(model, tmp_path / "adapter")
    merge_adapters(model)
    save_hf_classifier(model, tmp_path / "model")
    make_byte_lm(tmp_path / "lm", layers=1, d_model=16, heads=2)
    assert (tmp_path / "model" / "model.safetensors").exists() and (tmp_path / "lm" / "model.safetensors").exists()
    for name in ("adapter", "model", "lm"):
        assert _bad_modes(tmp_path / name, umask) == []


def test_no_private_temp_files_left_in_src():
    """A new mkstemp/mkdtemp/save_file site would bring the private modes back: use attar.checkpoint's
    make_temp_* and atomic_save_safetensors. (mkdtemp for a ``.old`` trash folder, deleted at once, is harmless.)"""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "attar"
    bad = []
    for p in src.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"mkstemp\(|NamedTemporaryFile\(|mkdtemp\(|\bsave_file\(", line) and 'suffix=".old"' not in line:
                bad.append(f"{p.relative_to(src)}:{i}: {line.strip()}")
    assert bad == []
