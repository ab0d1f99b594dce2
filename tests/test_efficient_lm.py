"""The efficient-training options (issue 15) on causal-LM recipe stages: each one runs on a tiny byte LM, a run
stopped mid-way and resumed ends with the weights of an uninterrupted one, they do what they say (FP8 codes in the
checkpoint, masked weights zero, stacked blocks, SLTrain's smaller parameter count with a plain dense folder saved),
and they are refused by name where they cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import attar.stages.lm as lm_stage
from attar.errors import AttarError
from attar.pipeline import Pipeline
from attar.recipe import load_recipe
from attar.text.charlm import load_causal_lm

BYTE = {"layers": 1, "d_model": 16, "heads": 2, "context": 96}
TRAIN = {"steps": 8, "batch_size": 8, "lr": 5e-3, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 0}


def _corpus(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["time", "love", "code", "rain", "salt", "wind", "fire", "snow", "stone", "river", "light", "song"]
    path.write_text("\n".join(" ".join(words[int(j)] for j in torch.randint(0, 12, (12,), generator=g)) + f" {i}."
                              for i in range(160)))
    return path


def _recipe(tmp_path: Path, train: dict, model: dict | None = None, small: bool = False, lm: dict | None = None) -> Path:
    corpus = str(_corpus(tmp_path / "corpus.txt"))
    data = {"name": corpus, "max_len": 48}
    stages = [{"name": "small", "kind": "train", "model": {"byte": BYTE}, "data": data,
               "train": {"steps": 4, "batch_size": 8, "lr": 5e-3}}] if small else []
    stages.append({"name": "s", "kind": "train", "model": model or {"byte": BYTE}, "data": data,
                   "train": TRAIN | train, **({"lm": lm} if lm else {})})
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"name": "eff", "seed": 3, "stages": stages}))
    return r


def _run(recipe: Path, home: Path, resume: Path | None = None) -> Path:
    return Pipeline(*load_recipe(recipe), home=home, log=lambda *a, **k: None).run(resume)


class Stop(Exception):
    pass


@pytest.fixture
def stop_at_step_4(monkeypatch):
    """Once armed (``.append("armed")``), stage ``s`` raises after its step-4 metrics, once: a run that dies mid-way
    with checkpoints behind it."""
    real, fired = lm_stage.distill_lm, []

    def stopping(*a, on_metrics=None, ckpt_dir=None, **k):
        def stop(step, rec):
            if on_metrics is not None:
                on_metrics(step, rec)
            if step == 4 and Path(ckpt_dir).parent.name == "s" and fired == ["armed"]:
                fired.append(step)
                raise Stop
        return real(*a, on_metrics=stop, ckpt_dir=ckpt_dir, **k)

    monkeypatch.setattr(lm_stage, "distill_lm", stopping)
    return fired


OPTIONS = {
    "fp8_state": ({"optimizer_state": {"dtype": "fp8_e4m3", "expansion": "dynamic", "group": 16}}, None),
    "galore": ({"optimizer": {"name": "adamw", "projection": {"rank": 4, "update_every": 3}}}, None),
    "spdf": ({"sparsity": {"sparsity": 0.75, "dense_from": 6}}, None),
    "sltrain": ({}, {"byte": BYTE, "parameterization": {"sltrain": {"rank": 4, "sparsity": 0.9}}}),
    "growth": ({"growth": {"method": "g_stack", "from": "small", "factor": 2}}, {"byte": BYTE | {"layers": 2}}),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_lm_stage_with_the_option_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, stop_at_step_4, option):
    train, model = OPTIONS[option]
    recipe = _recipe(tmp_path, train, model, small=option == "growth")
    ref = _run(recipe, tmp_path / "ref")
    home = tmp_path / "stopped"
    stop_at_step_4.append("armed")
    with pytest.raises(Stop):
        _run(recipe, home)
    assert stop_at_step_4 == ["armed", 4]
    run_dir = next(p for p in home.iterdir() if (p / "run.json").exists())
    ckpts = sorted((run_dir / "s" / "checkpoints").glob("step-*"))
    assert ckpts, "the stopped run left no checkpoint to resume from"
    if option == "fp8_state":  # the moments travel in the checkpoint as FP8 codes
        dtypes = {t.dtype for f in ckpts[-1].glob("*.safetensors") for t in load_file(f).values()}
        assert torch.float8_e4m3fn in dtypes
    _run(recipe, home, resume=run_dir)
    a = load_file(ref / "s" / "model" / "model.safetensors")
    b = load_file(run_dir / "s" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((ref / "s" / "lm-metrics.json").read_text())["metrics"]
    assert metrics["steps"] == TRAIN["steps"] and metrics["test_ppl"] < 258  # trained: better than uniform bytes
    if option == "sltrain":  # fewer trained numbers than the dense model; the folder holds plain dense weights
        dense = sum(p.numel() * 4 for p in load_causal_lm(ref / "s" / "model")[0].parameters())
        assert metrics["sltrain_parameters_bytes"] < dense
        assert not any("parametrizations" in k for k in a)


def test_spdf_masked_weights_of_an_lm_stage_are_zero_until_the_dense_phase(tmp_path):
    """Never dense (dense_from past the last step): 75% of each block matrix is exactly zero in the saved model;
    embeddings (and the head tied to them) stay dense."""
    run = _run(_recipe(tmp_path, {"sparsity": {"sparsity": 0.75, "dense_from": 100}}), tmp_path / "h")
    w = load_file(run / "s" / "model" / "model.safetensors")
    for k in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"):
        assert float((w[k] == 0).float().mean()) == pytest.approx(0.75, abs=1e-3), k
    assert float((w["transformer.wte.weight"] == 0).float().mean()) < 0.01


def test_growth_starts_the_lm_stage_from_the_stacked_source(tmp_path):
    """With a learning rate too small to move the weights, the grown stage's blocks are the source's block 0 twice,
    and its embeddings are the source's."""
    run = _run(_recipe(tmp_path, {"growth": {"from": "small", "factor": 2}, "lr": 1e-12, "steps": 1},
                       {"byte": BYTE | {"layers": 2}}, small=True), tmp_path / "h")
    src = load_file(run / "small" / "model" / "model.safetensors")
    big = load_file(run / "s" / "model" / "model.safetensors")
    for k, v in big.items():
        s = k.replace("transformer.h.1.", "transformer.h.0.")
        assert torch.allclose(v, src[s], atol=1e-6), k
    assert len([k for k in big if k.startswith("transformer.h.1.")]) > 0


@pytest.mark.parametrize("train,model,lm,small,message", [
    ({"sparsity": {"dense_from": 2}, "fsdp": True}, None, None, False, "do not combine with fsdp"),
    ({"optimizer_state": {"dtype": "fp8_e4m3"}, "optimizer": "sgd"}, None, None, False, "AdamW's state"),
    ({"optimizer_state": {"dtype": "fp8_e4m3"}}, None, {"optimizer": "mezo"}, False, "optimizer: mezo"),
    ({"sparsity": {"dense_from": 2}}, {"byte": BYTE, "lora": {"rank": 2}}, None, False, "only the adapters train"),
    ({"growth": {"from": "small"}}, {"byte": BYTE | {"layers": 3}}, None, True, "factor 2 makes 2"),
    ({"growth": {"from": "small"}}, {"stage": "small"}, None, True, "give a fresh model"),
    ({"growth": {"from": "small"}}, {"byte": BYTE | {"layers": 2},
                                     "parameterization": {"sltrain": {"rank": 4, "sparsity": 0.9}}},
     None, True, "drop one of them"),
    ({"growth": {"from": "nowhere"}}, {"byte": BYTE | {"layers": 2}}, None, False, "'nowhere', which is no stage"),
    ({}, {"pretrained": "smollm2-135m", "parameterization": {"sltrain": {"rank": 4, "sparsity": 0.9}}}, None,
     False, "give byte"),
])
def test_options_that_cannot_apply_are_refused_before_anything_trains(tmp_path, train, model, lm, small, message):
    with pytest.raises((AttarError, ValueError), match=message):
        _run(_recipe(tmp_path, train, model, small=small, lm=lm), tmp_path / "h")
    assert not list((tmp_path / "h").glob("*/*/model/config.json"))  # refused in preflight: nothing trained
