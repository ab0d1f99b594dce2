"""Selectors in text fine-tuning (``finetune(..., selector=...)`` and ``finetune: {selector: ...}``), on a tiny
random BERT: the selector trains on its part of the data and reports its cost; bad specs fail before training."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from attar.adapt import finetune
from attar.errors import AttarError
from attar.text.tiny import make_tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftsel")
    make_tiny_bert(root / "bert", hidden=32, layers=1, intermediate=64)
    words = {"pos": ["love", "great", "good"], "neg": ["hate", "terrible", "bad"]}
    rows = [(f"i {words[c][i % 3]} self driving cars", c) for i in range(60) for c in ("pos", "neg")]
    pd.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}).to_csv(root / "t.csv", index=False)
    return root


def _data(files):
    return {"csv": str(files / "t.csv"), "max_length": 12}


@pytest.mark.parametrize("spec", [{"name": "rs2", "keep": 0.5}, {"name": "high_loss", "keep": 0.5, "level": "row"},
                                  {"name": "uds", "keep": 0.5, "signal": "error"}], ids=lambda s: s["name"])
def test_finetune_with_a_selector_trains_on_its_part_and_reports_the_cost(files, spec):
    full = finetune(files / "bert", _data(files), "head", {"epochs": 1, "batch_size": 8}, seed=0)
    r = finetune(files / "bert", _data(files), "head", {"epochs": 1, "batch_size": 8}, seed=0, selector=spec)
    n = full.metrics["samples_seen"]
    st = r.metrics["selection"]
    assert r.metrics["selector"]["name"] == spec["name"] and st["trained_rows"] == r.metrics["samples_seen"]
    if spec["name"] == "rs2":
        assert r.metrics["samples_seen"] < n and st["scoring_forward_rows"] == 0
    else:  # online: an epoch scores every row (candidates) and trains on the kept half of them
        assert r.metrics["samples_seen"] == n // 2 and st["scoring_forward_rows"] == st["candidate_rows"] == n
    assert math.isfinite(r.metrics["test_accuracy"]) and st["train_seconds"] > 0


@pytest.mark.parametrize("spec,kw,match", [
    ({"name": "nope"}, {}, r"selector: name: unknown selector 'nope'. Known selectors: .*rs2"),
    ({"name": "rs2", "keep": 0}, {}, r"selector: .*keep: Input should be greater than 0"),
    ({"name": "disagreement"}, {}, r"selector: name: selector 'disagreement' .*no teacher"),
    ({"name": "efficienttrain"}, {}, r"selector: selector 'efficienttrain' filters images"),
    ({"name": "rs2", "keep": 0.5}, {"optimizer": "mezo"}, r"selector: 'rs2' needs optimizer backprop"),
])
def test_bad_selectors_fail_before_training(files, tmp_path, spec, kw, match):
    from attar.adapt.api import check_finetune

    with pytest.raises(AttarError, match=match):
        finetune(files / "bert", _data(files), "head", {"epochs": 1}, tmp_path / "o", selector=spec, **kw)
    assert not (tmp_path / "o").exists()
    with pytest.raises(AttarError, match=match):
        check_finetune({"model": str(files / "bert"), "data": _data(files), "adapter": "head", "selector": spec} | kw)
