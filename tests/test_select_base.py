import pytest
import torch
from torch import nn

from attar.errors import AttarError
from attar.train.config import TrainConfig
from attar.select import build_selector
from attar.train.trainer import Trainer
from tiny_task import CE


def test_uniform_keep_trains_on_that_fraction_of_each_epoch():
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    cfg = TrainConfig(epochs=2, batch_size=50)
    full = Trainer(nn.Linear(64, 10), CE(), x, y, cfg).fit()
    half = Trainer(nn.Linear(64, 10), CE(), x, y, cfg, selector=build_selector({"name": "uniform", "keep": 0.5})).fit()
    assert full.steps == 2 * (1797 // 50)
    assert half.steps == 2 * (899 // 50)  # ceil(0.5 * 1797) rows per epoch
    assert half.samples_seen == half.steps * 50


def test_selector_errors_name_field_and_known():
    with pytest.raises(AttarError, match="Known selectors: .*uniform"):
        build_selector({"name": "nope"})
    with pytest.raises(AttarError, match="keep"):
        build_selector({"name": "uniform", "keep": 2})


def test_selectors_are_built_through_the_registry_with_its_wording():
    from attar.select import SELECTORS

    a, b = build_selector({"name": "uniform", "keep": 0.5}), SELECTORS.build({"name": "uniform", "keep": 0.5})
    assert type(a) is type(b) and a.p == b.p and a.spec() == {"name": "uniform", "keep": 0.5}
    assert build_selector(None) is None and build_selector({}) is None
    assert SELECTORS.fields("uniform")["keep"]["type"] == "float > 0 and <= 1"
    with pytest.raises(AttarError) as e:
        build_selector({"name": "uniform", "kep": 0.5})
    assert "selector 'uniform': unknown field 'kep'" in str(e.value) and "Accepted fields: keep (float" in str(e.value)
    with pytest.raises(AttarError, match=r"field 'keep' = nan"):
        build_selector({"name": "uniform", "keep": float("nan")})
    with pytest.raises(AttarError, match="mapping with a 'name'.*known selectors: .*uniform"):
        build_selector({"keep": 0.5})
