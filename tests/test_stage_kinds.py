"""Stage kinds on hand-made StageInputs: a kind works from its inputs alone, never from a pipeline or recipe."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attar.errors import AttarError
from attar.models import build_model
from attar.specs import ModelSpec
from attar.stages import STAGES, EarlierStage, StageContext, StageInputs

SPEC = {"arch": "mlp", "hidden": [3]}


def _mlp(seed: int, hidden: int = 3):
    torch.manual_seed(seed)
    return build_model(ModelSpec(arch="mlp", hidden=[hidden]), (4,), 2)


def _bundle():
    test = SimpleNamespace(x=torch.rand(6, 4, generator=torch.Generator().manual_seed(0)), y=torch.tensor([0, 1] * 3))
    return SimpleNamespace(input_shape=(4,), classes=["a", "b"], mean=None, std=None, name="toy", test=test)


def _merge_inputs(earlier, method="linear", models=("a", "b")):
    options = STAGES.get("merge").parse_options("merge", {"method": method, "models": list(models)})
    return StageInputs(name="soup", kind="merge", index=2, seed=0, options=options, data=_bundle(), earlier=earlier)


def test_evaluate_returns_the_model_it_was_given():
    model = _mlp(0)
    res = STAGES.get("evaluate")().run(StageInputs(name="e", kind="evaluate", index=0, seed=0, model=model,
                                                   model_spec=SPEC), ctx=None)
    assert res.model is model and res.spec == SPEC


def test_merge_stage_averages_its_earlier_inputs_and_saves_them(tmp_path: Path):
    a, b = _mlp(1), _mlp(2)
    earlier = {"a": EarlierStage("a", "train", a, SPEC, 2), "b": EarlierStage("b", "train", b, SPEC, 2)}
    inputs = _merge_inputs(earlier)
    ctx = StageContext(tmp_path, tmp_path / "soup", 2)
    kind = STAGES.get("merge")()
    assert kind.preflight(inputs) == 2
    res = kind.run(inputs, ctx)
    want = {k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()}
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, want[k])
    assert res.spec == SPEC and (tmp_path / "soup" / "model" / "manifest.json").exists()
    assert {"accuracy[a]", "forgetting[a]", "accuracy[b]", "forgetting[b]", "forgetting"} <= set(res.extra)


def test_merge_preflight_names_the_tensor_when_stand_ins_differ():
    earlier = {"a": EarlierStage("a", "train", _mlp(1, 3), SPEC, 2), "b": EarlierStage("b", "train", _mlp(2, 5), SPEC, 2)}
    with pytest.raises(AttarError, match=r"stage 'soup' \(merge\).*(shape|\[3).*"):
        STAGES.get("merge")().preflight(_merge_inputs(earlier))
    earlier["b"] = EarlierStage("b", "train", _mlp(2), SPEC, 3)
    with pytest.raises(AttarError, match="different numbers of classes"):
        STAGES.get("merge")().preflight(_merge_inputs(earlier))


def test_train_preflight_names_the_field_of_a_bad_augmentation():
    from attar.train.config import TrainConfig
    from attar.train.objective import build_objective

    x = torch.rand(8, 1, 8, 8)
    data = SimpleNamespace(input_shape=(1, 8, 8), classes=["a", "b"], train=SimpleNamespace(x=x, y=torch.zeros(8).long()))
    inputs = StageInputs(name="t", kind="train", index=3, seed=0, spec=SimpleNamespace(data=None),
                         train=TrainConfig(augment=["rotate"]), data=data, objective=build_objective({"name": "ce"}))
    with pytest.raises(AttarError, match=r"stage 't' \(stages\[3\]\.train\.augment\): Unknown augmentation 'rotate'"):
        STAGES.get("train")().preflight(inputs)
