import pytest
import torch
from torch import nn

from attar.errors import AttarError
from attar.objective import Objective
from attar.train.config import TrainConfig
from attar.select import build_selector
from attar.train.trainer import Trainer


class CE(Objective):
    def forward(self, batch, logits):
        return {"loss": nn.functional.cross_entropy(logits, batch.y)}


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
