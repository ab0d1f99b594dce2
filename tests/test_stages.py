"""Recipe stage kinds beyond train/distill: merge, condense and finetune, run through `attar run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from attar.cli import app
from attar.errors import AttarError
from attar.recipe import parse_recipe

runner = CliRunner()
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]


def _run(tmp_path: Path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    res = runner.invoke(app, ["run", str(p), "--home", str(tmp_path / "home")])
    runs = [d for d in (tmp_path / "home").glob("2*") if d.is_dir()] if (tmp_path / "home").exists() else []
    return res, runs


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


MERGE = """\
name: soup
data: {name: digits}
stages:
  - name: pre
    kind: train
    model: {arch: mlp, hidden: [16]}
    train: {epochs: 2, batch_size: 64, lr: 0.003}
  - name: ft_a
    kind: train
    init: pre
    train: {epochs: 1, batch_size: 64, lr: 0.003}
  - name: ft_b
    kind: train
    init: pre
    seed: 5
    train: {epochs: 1, batch_size: 32, lr: 0.001}
  - name: soup
    kind: merge
    merge: {method: linear, models: [ft_a, ft_b], model_parameters: [{weight: 3}, {weight: 1}]}
  - name: ta
    kind: merge
    merge: {method: task_arithmetic, base: pre, models: [ft_a, ft_b], parameters: {lambda: 0.5}}
  - name: greedy
    kind: merge
    merge: {method: greedy_soup, models: [ft_a, ft_b]}
"""


def test_merge_stage_matches_independent_arithmetic(tmp_path):
    res, runs = _run(tmp_path, MERGE)
    assert res.exit_code == 0, res.output
    (run,) = runs
    w = {s: _weights(run / s / "model") for s in ("pre", "ft_a", "ft_b", "soup", "ta", "greedy")}
    assert set(w["soup"]) == set(w["ft_a"])
    for k in w["soup"]:  # weights normalised: (3 a + 1 b) / 4
        torch.testing.assert_close(w["soup"][k], (3 * w["ft_a"][k] + w["ft_b"][k]) / 4, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w["ta"][k], w["pre"][k] + 0.5 * ((w["ft_a"][k] - w["pre"][k]) + (w["ft_b"][k] - w["pre"][k])),
                                   rtol=1e-5, atol=1e-6)
    report = (run / "report.md").read_text()
    assert "| soup |" in report and "| greedy |" in report
    # greedy soup starts from the best ingredient by validation: its result is one ingredient or their average
    g = w["greedy"]
    candidates = [w["ft_a"], w["ft_b"], {k: (w["ft_a"][k] + w["ft_b"][k]) / 2 for k in g}]
    assert any(all(torch.allclose(g[k], c[k], atol=1e-6) for k in g) for c in candidates)
    lines = report.splitlines()
    header = [c.strip() for c in next(ln for ln in lines if ln.startswith("| stage |")).split("|")]
    row = [c.strip() for c in next(ln for ln in lines if ln.startswith("| greedy |")).split("|")]
    kept = row[header.index("kept")].split(", ")  # the report names the ingredients greedy soup kept
    assert kept and set(kept) <= {"ft_a", "ft_b"}
    if len(kept) == 1:
        assert all(torch.equal(g[k], w[kept[0]][k]) for k in g)


@pytest.mark.parametrize(
    "old,new,words",
    [
        ("method: linear", "method: lineer", ["unknown merge method 'lineer'", "task_arithmetic"]),
        ("models: [ft_a, ft_b], model", "models: [ft_a, later], model", ["'later', which is no stage"]),
        ("[{weight: 3}, {weight: 1}]", "[{weight: 3}]", ["1 entries for 2 models"]),
        ("merge: {method: linear", "merge: {methd: linear", ["merge.methd", "accepted here: method, models"]),
    ],
)
def test_bad_merge_stages_fail_at_load(old, new, words):
    with pytest.raises(AttarError) as e:
        parse_recipe(MERGE.replace(old, new, 1), "r.yaml")
    for w in words:
        assert w in str(e.value), str(e.value)


CONDENSE = """\
name: syn
data: {name: digits}
stages:
  - name: syn
    kind: condense
    condense: {method: herding, ipc: 3, model: {arch: convnet, width: 8, depth: 1}}
  - name: on_syn
    kind: train
    data: {stage: syn}
    model: {arch: mlp, hidden: [16]}
    train: {epochs: 30, batch_size: 10, lr: 0.01}
"""


def test_condense_stage_feeds_a_later_stage(tmp_path):
    res, runs = _run(tmp_path, CONDENSE)
    assert res.exit_code == 0, res.output
    (run,) = runs
    meta = json.loads((run / "syn" / "data" / "state.json").read_text())
    assert meta["method"] == "herding" and meta["ipc"] == 3
    hist = json.loads((run / "on_syn" / "history.json").read_text())
    assert hist[-1]["step"] == 30 * 3  # 30 rows (3 per class x 10 classes), batch 10: 3 steps per epoch
    from attar.store import RunStore

    store = RunStore(tmp_path / "home" / "runs.db")
    arts = {(a["stage"], a["name"]) for a in store.get_run(run.name)["artifacts"]}
    assert ("syn", "data") in arts and ("on_syn", "model") in arts


def test_condense_stage_ipc_too_large_fails_before_any_run(tmp_path):
    res, runs = _run(tmp_path, CONDENSE.replace("ipc: 3", "ipc: 5000"))
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "stage 'syn' (condense)" in out and "smallest class" in out, out
    assert runs == []


def test_data_stage_must_name_a_condense_stage(tmp_path):
    bad = CONDENSE.replace("data: {stage: syn}", "data: {stage: pre}").replace(
        "stages:\n", "stages:\n  - name: pre\n    kind: train\n    model: {arch: mlp, hidden: [4]}\n    train: {epochs: 1}\n", 1)
    res, runs = _run(tmp_path, bad)
    assert res.exit_code == 2 and "writes no data set" in " ".join(res.output.split())
    assert runs == []


def test_finetune_stage_scores_itself_and_writes_hf_and_peft(tmp_path, sentiment_files):
    recipe = f"""\
name: ft
stages:
  - name: lora
    kind: finetune
    finetune:
      model: {sentiment_files / 'bert'}
      data: {{csv: {sentiment_files / 't.csv'}, max_length: 12}}
      adapter: {{name: lora, rank: 4, targets: [query, value]}}
      train: {{epochs: 4, batch_size: 8, lr: 0.01}}
"""
    res, runs = _run(tmp_path, recipe)
    assert res.exit_code == 0, res.output
    (run,) = runs
    assert (run / "lora" / "model" / "config.json").exists()
    assert (run / "lora" / "adapter" / "adapter_config.json").exists()
    assert "| lora |" in (run / "report.md").read_text()
    bad = recipe.replace("targets: [query, value]", "targets: [nothing_like_this]")
    res, runs2 = _run(tmp_path / "b", bad) if (tmp_path / "b").mkdir() is None else (None, None)
    assert res.exit_code == 2 and "nothing_like_this" in res.output
    assert runs2 == []


def test_main_cli_mounts_condense_finetune_and_data_show(tmp_path):
    out = tmp_path / "syn"
    res = runner.invoke(app, ["condense", "--data", "digits", "--method", "herding", "--ipc", "2", "--out", str(out),
                              "--width", "8", "--depth", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "show", str(out), "--png", str(tmp_path / "g.png")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "show", "digits", "--png", str(tmp_path / "d.png"), "--per-class", "3"])
    assert res.exit_code == 0, res.output
    for png in ("g.png", "d.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(app, ["condense", "--data", "digits", "--method", "herding", "--ipc", "999", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "smallest class" in " ".join(res.output.split())
    assert not (tmp_path / "x").exists()
    res = runner.invoke(app, ["methods", "adapters"])
    assert res.exit_code == 0 and "lora" in res.output
