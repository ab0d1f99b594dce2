"""Forgetting on the pre-training task for LM fine-tuning and distillation (issue 13): ``lm: {forgetting: TEXT}``
scores a stand-in for the starting model's pre-training text before and after the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from attar.distill.lm import perplexity
from attar.errors import AttarError
from attar.pipeline import Pipeline
from attar.recipe import load_recipe, parse_recipe
from attar.text.charlm import byte_tokenizer, lm_data, load_causal_lm
from test_lm_stage import _corpus

BYTE = {"byte": {"layers": 1, "d_model": 16, "heads": 2, "context": 96}}


def _other(path: Path, n: int = 200) -> Path:
    """A second text, unlike the first corpus: what the fine-tune trains on."""
    path.write_text("\n".join(f"{i} plus {i + 1} makes {2 * i + 1}; {i} times two is {2 * i}, QED #{i}!" for i in range(n)))
    return path


def test_forgetting_reports_the_pretraining_texts_perplexity_before_and_after(tmp_path):
    pre, ft = _corpus(tmp_path / "pre.txt"), _other(tmp_path / "ft.txt")
    text = {"name": str(pre), "max_len": 48, "test_limit": 24}
    recipe = {"name": "forget", "seed": 3, "stages": [
        {"name": "base", "kind": "train", "model": BYTE, "data": {"name": str(pre), "max_len": 48},
         "train": {"steps": 150, "batch_size": 8, "lr": 1e-2}},
        {"name": "tuned", "kind": "finetune", "model": {"stage": "base"}, "data": {"name": str(ft), "max_len": 48},
         "train": {"steps": 60, "batch_size": 8, "lr": 1e-2}, "lm": {"forgetting": text}},
    ]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    run = Pipeline(*load_recipe(tmp_path / "r.yaml"), home=tmp_path / "runs", log=lambda *a, **k: None).run()
    m = json.loads((run / "tuned" / "lm-metrics.json").read_text())["metrics"]
    # independently: both saved models on the same test rows of the pre-training text (drawn with seed 0)
    rows = lm_data(pre.read_text().splitlines(), byte_tokenizer(), prompt_len=16, max_len=48, seed=0, test_limit=24)
    base = load_causal_lm(run / "base" / "model")[0]
    tuned = load_causal_lm(run / "tuned" / "model")[0]
    assert m["pretrain_ppl_before"] == pytest.approx(perplexity(base, rows.test, rows.pad_id), rel=1e-5)
    assert m["pretrain_ppl"] == pytest.approx(perplexity(tuned, rows.test, rows.pad_id), rel=1e-5)
    assert m["forgetting_ppl"] == pytest.approx(m["pretrain_ppl"] - m["pretrain_ppl_before"], rel=1e-6)
    assert m["forgetting_ppl"] > 0  # 60 steps on unlike text: the base's corpus got worse
    saved = json.loads((run / "tuned" / "forgetting.json").read_text())
    assert saved["pretrain_ppl_before"] == m["pretrain_ppl_before"] and saved["rows"] == 24


def _stage(**extra) -> dict:
    return {"stages": [{"name": "s", "kind": "finetune", "model": {"pretrained": "smollm2-135m"}} | extra]}


def test_forgetting_on_a_fresh_model_or_on_the_training_text_is_refused():
    with pytest.raises(AttarError, match="forgetting: a fresh byte-level model has no pre-training"):
        parse_recipe(yaml.safe_dump({"stages": [{"name": "s", "kind": "train", "model": BYTE,
                                                  "lm": {"forgetting": {"name": "tweets"}}}]}))
    with pytest.raises(AttarError, match="forgetting: names the stage's own training text"):
        parse_recipe(yaml.safe_dump(_stage(data={"name": "fortunes"}, lm={"forgetting": {"name": "fortunes"}})))
    with pytest.raises(AttarError, match="forgetting"):
        parse_recipe(yaml.safe_dump(_stage(lm={"forgetting": {"name": "tweets", "bogus": 1}})))
    st = parse_recipe(yaml.safe_dump(_stage(lm={"forgetting": {"name": "tweets", "test_limit": 50}}))).stages[0]
    assert st.options.forgetting.name == "tweets" and st.options.forgetting.test_limit == 50
