"""SLTrain (model.parameterization: {sltrain: {rank, sparsity}}): W = B A + S with a support that never changes."""

import pytest
import torch

from attar.errors import AttarError
from attar.models import build_model, load_model, save_model
from attar.models.sltrain import parameter_bytes, supports
from attar.train.config import TrainConfig
from attar.train.trainer import Trainer
from tiny_task import CE, digits

pytestmark = pytest.mark.usefixtures("one_thread")


SPEC = {"arch": "mlp", "hidden": [96, 48], "parameterization": {"sltrain": {"rank": 6, "sparsity": 0.9}}}


def _layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "parametrizations")}


def test_support_never_changes_and_only_b_a_and_its_values_train():
    x, y = digits(images=True)
    torch.manual_seed(0)
    model = build_model(SPEC, (1, 8, 8), 10)
    before = {k: v.clone() for k, v in supports(model).items()}
    assert set(before) == {"net.body.0", "net.body.2", "net.classifier"}
    for name, s in before.items():  # 10% of each matrix, distinct positions, int32
        w = model.get_submodule(name).weight
        assert s.dtype == torch.int32 and len(s) == round(0.1 * w.numel()) and len(s.unique()) == len(s)
    w0 = {n: m.weight.detach().clone() for n, m in _layers(model).items()}
    res = Trainer(model, CE(), x, y, TrainConfig(epochs=3, batch_size=64, lr=3e-3), seed=0).fit()
    after = supports(res.model)
    for name in before:
        assert torch.equal(before[name], after[name])
    for name, mod in _layers(res.model).items():
        p = mod.parametrizations.weight
        b, a, values = p.original0, p.original1, p.original2
        sparse = (mod.weight - b @ a).detach().reshape(-1)  # S, read back from the layer's weight
        off = torch.ones_like(sparse, dtype=torch.bool)
        off[before[name].long()] = False
        assert bool((sparse[off].abs() < 1e-6).all())  # zero off the support, after training
        torch.testing.assert_close(sparse[~off], values.detach(), rtol=1e-4, atol=1e-5)
        assert not torch.equal(mod.weight.detach(), w0[name])  # it trained
    assert res.history[-1]["train_loss"] < 0.8 * res.history[0]["train_loss"]


def test_parameter_bytes_measured_and_artifact_round_trip(tmp_path):
    torch.manual_seed(0)
    dense = build_model({"arch": "mlp", "hidden": [96, 48]}, (1, 8, 8), 10)
    torch.manual_seed(0)
    sl = build_model(SPEC, (1, 8, 8), 10)
    d, s = parameter_bytes(dense), parameter_bytes(sl)
    mats = [(64, 96), (96, 48), (48, 10)]
    assert d["parameters"] == 4 * (sum(m * n + n for m, n in mats))
    expected = sum(6 * (m + n) + round(0.1 * m * n) + n for m, n in mats)  # B, A, values and the biases
    assert s["parameters"] == 4 * expected and s["support"] == 4 * sum(round(0.1 * m * n) for m, n in mats)
    assert s["parameters"] + s["support"] < 0.45 * d["parameters"]  # 0.40 here (SLTrain: up to 73% less)
    save_model(tmp_path / "m", sl)
    back, info = load_model(tmp_path / "m")
    assert info["spec"]["parameterization"]["sltrain"]["rank"] == 6
    xs = torch.rand(5, 1, 8, 8)
    assert torch.equal(back(xs), sl(xs))
    for k, v in supports(sl).items():
        assert torch.equal(supports(back)[k], v)


def test_bad_settings_are_named():
    with pytest.raises(AttarError, match="lower the rank"):
        build_model({"arch": "mlp", "hidden": [8], "parameterization": {"sltrain": {"rank": 8, "sparsity": 0.5}}},
                    (1, 8, 8), 10)
    from pydantic import ValidationError

    from attar.specs import ModelSpec

    with pytest.raises(ValidationError, match="sparsity"):
        ModelSpec.model_validate({"arch": "mlp", "parameterization": {"sltrain": {"rank": 2, "sparsity": 1.0}}})
