"""Selectors in text fine-tuning (``finetune(..., selector=...)`` and ``finetune: {selector: ...}``), on a tiny
random BERT: the selector trains on its part of the data and reports its cost; bad specs fail before training."""

from __future__ import annotations

import math

import pytest

from attar.adapt import finetune
from attar.errors import AttarError

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]


def _data(sentiment_files):
    return {"csv": str(sentiment_files / "t.csv"), "max_length": 12}


@pytest.mark.parametrize("spec", [{"name": "rs2", "keep": 0.5}, {"name": "high_loss", "keep": 0.5, "level": "row"},
                                  {"name": "uds", "keep": 0.5, "signal": "error"}], ids=lambda s: s["name"])
def test_finetune_with_a_selector_trains_on_its_part_and_reports_the_cost(sentiment_files, spec):
    full = finetune(sentiment_files / "bert", _data(sentiment_files), "head", {"epochs": 1, "batch_size": 8}, seed=0)
    r = finetune(sentiment_files / "bert", _data(sentiment_files), "head", {"epochs": 1, "batch_size": 8}, seed=0, selector=spec)
    n = full.metrics["samples_seen"]
    st = r.metrics["selection"]
    assert r.metrics["selector"]["name"] == spec["name"] and st["trained_rows"] == r.metrics["samples_seen"]
    if spec["name"] == "rs2":
        assert r.metrics["samples_seen"] < n and st["scoring_forward_rows"] == 0
    else:  # online: an epoch scores every row (candidates) and trains on the kept half of them
        assert r.metrics["samples_seen"] == n // 2 and st["scoring_forward_rows"] == st["candidate_rows"] == n
    assert math.isfinite(r.metrics["test_accuracy"]) and st["train_seconds"] > 0


@pytest.mark.parametrize("spec,kw,match", [
    ({"name": "nope"}, {}, r"selector: Unknown selector 'nope'. Known selectors: .*rs2"),
    ({"name": "rs2", "keep": 0}, {}, r"selector: .*field 'keep' = 0: Input should be greater than 0"),
    ({"name": "disagreement"}, {}, r"selector: name: selector 'disagreement' .*no teacher"),
    ({"name": "efficienttrain"}, {}, r"selector: selector 'efficienttrain' filters images"),
    ({"name": "rs2", "keep": 0.5}, {"optimizer": "mezo"}, r"selector: 'rs2' needs optimizer backprop"),
])
def test_bad_selectors_fail_before_training(sentiment_files, tmp_path, spec, kw, match):
    from attar.adapt.api import check_finetune

    with pytest.raises(AttarError, match=match):
        finetune(sentiment_files / "bert", _data(sentiment_files), "head", {"epochs": 1}, tmp_path / "o", selector=spec, **kw)
    assert not (tmp_path / "o").exists()
    with pytest.raises(AttarError, match=match):
        check_finetune({"model": str(sentiment_files / "bert"), "data": _data(sentiment_files), "adapter": "head", "selector": spec} | kw)
