"""Causal LMs as ordinary ``train`` / ``distill`` / ``finetune`` recipe stages: which entries are LM stages, the
mistakes refused at load with the recipe's own field names, and the same weights as the ``kind: lm`` spelling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from attar.errors import AttarError
from attar.pipeline import Pipeline
from attar.recipe import LMStageSpec, StageSpec, is_causal_lm_stage, load_recipe, parse_recipe
from attar.stages.lm import LMStage
from test_lm_stage import _corpus

BYTE = {"byte": {"layers": 1, "d_model": 16, "heads": 2, "context": 96}}


def _one(stage: dict) -> StageSpec:
    return parse_recipe(yaml.safe_dump({"stages": [{"name": "s"} | stage]})).stages[0]


@pytest.mark.parametrize("stage", [
    {"kind": "train", "model": BYTE},
    {"kind": "finetune", "model": {"pretrained": "smollm2-135m"}},
    {"kind": "train", "model": {"pretrained": "smollm2-135m", "lora": {"rank": 4}}},
    {"kind": "distill", "model": {"pretrained": "smollm2-135m", "prune": {"layers": 15}},
     "teacher": {"pretrained": "smollm2-135m"}},
    {"kind": "train", "model": BYTE, "data": {"name": "fortunes", "max_len": 64}},
    {"kind": "train", "model": BYTE, "lm": {"optimizer": "mezo"}},
])
def test_a_causal_lm_spec_makes_a_language_model_stage(stage):
    st = _one(stage)
    assert isinstance(st, LMStageSpec) and st.kind == stage["kind"] and st.kind_spec() is LMStage
    assert st.options.student == st.model


def test_an_image_model_spec_keeps_the_image_stage():
    st = _one({"kind": "train", "model": {"arch": "mlp"}, "data": "digits"})
    assert not isinstance(st, LMStageSpec) and st.kind_spec() is not LMStage
    assert not is_causal_lm_stage({"kind": "train", "model": {"pretrained": "mnist-cnn"}})
    assert not is_causal_lm_stage({"kind": "merge", "model": BYTE})  # only train/distill/finetune have an LM form


def test_an_hf_folder_is_an_lm_stage_when_its_config_names_a_causal_lm(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    assert is_causal_lm_stage({"kind": "finetune", "model": {"hf": str(tmp_path / "lm")}})
    assert not is_causal_lm_stage({"kind": "finetune", "model": {"hf": str(tmp_path / "cls")}})


def test_a_teacher_named_by_stage_becomes_that_stages_model():
    r = parse_recipe(yaml.safe_dump({"stages": [
        {"name": "t", "kind": "train", "model": BYTE},
        {"name": "s", "kind": "distill", "model": BYTE, "teacher": "t", "train": {"alpha": 0.5}, "lm": {"cache_topk": 8}},
    ]}))
    o = r.stages[1].options
    assert o.teacher.stage == "t" and o.cache_topk == 8 and o.train.alpha == 0.5


@pytest.mark.parametrize("stage,words", [
    ({"kind": "distill", "model": BYTE}, "needs a 'teacher'"),
    ({"kind": "finetune", "model": BYTE}, "starts from a trained model"),
    ({"kind": "train", "model": BYTE, "objective": {"name": "kd"}}, "takes no objective"),
    ({"kind": "train", "model": BYTE, "init": "x"}, "model: {stage: NAME}"),
    ({"kind": "train", "model": BYTE, "lm": {"responses": "teacher"}}, "needs teacher"),
    ({"kind": "train", "model": BYTE, "lm": {"cache_k": 3}}, "cache_k"),
    ({"kind": "train", "model": BYTE, "train": {"epochs": 3}}, "epochs"),
    ({"kind": "distill", "model": BYTE, "teacher": "later"}, "refers to 'later'"),
])
def test_mistakes_are_refused_at_load_in_the_recipes_own_words(stage, words):
    with pytest.raises(AttarError, match=words) as e:
        _one(stage)
    assert "lm.teacher" not in str(e.value) and "lm.student" not in str(e.value)


def _weights(run: Path, stage: str) -> dict:
    return load_file(str(run / stage / "model" / "model.safetensors"))


def test_train_and_distill_stages_equal_the_kind_lm_spelling(tmp_path):
    """The same two stages written both ways train to the same weights (one path: the ``lm`` stage kind)."""
    data = {"name": str(_corpus(tmp_path / "corpus.txt")), "max_len": 80}
    teacher = {"byte": {"layers": 1, "d_model": 32, "heads": 2, "context": 96}}
    t_train = {"steps": 8, "batch_size": 16, "lr": 0.005, "eval_every": 4}
    s_train = {"steps": 6, "batch_size": 16, "lr": 0.005, "eval_every": 3, "alpha": 0.5}
    new = {"name": "r", "seed": 2, "stages": [
        {"name": "teacher", "kind": "train", "model": teacher, "data": data, "train": t_train},
        {"name": "student", "kind": "distill", "model": BYTE, "teacher": "teacher", "data": data, "train": s_train,
         "lm": {"cache_topk": 8}}]}
    old = {"name": "r", "seed": 2, "stages": [
        {"name": "teacher", "kind": "lm", "lm": {"student": teacher, "data": data, "train": t_train}},
        {"name": "student", "kind": "lm", "lm": {"student": BYTE, "teacher": {"stage": "teacher"}, "data": data,
                                                 "train": s_train, "cache_topk": 8}}]}
    runs = []
    for name, recipe in (("new", new), ("old", old)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        runs.append(Pipeline(*load_recipe(path), home=tmp_path / name, log=lambda *a, **k: None).run())
    for stage in ("teacher", "student"):
        a, b = _weights(runs[0], stage), _weights(runs[1], stage)
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    m = json.loads((runs[0] / "student" / "lm-metrics.json").read_text())["metrics"]
    assert m["test_ppl"] < 258 and 0 <= m["top1_agreement"] <= 1  # a trained byte model beats uniform bytes
    report = (runs[0] / "report.md").read_text()
    assert "distill" in report and "test_ppl" in report
