"""The one task-vector method and its presets, and merge parameters validated by each method's Params."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from attar.errors import AttarError
from attar.merge import merge_models, merge_state_dicts, run_merge
from attar.merge.config import load_merge_config
from attar.merge.methods import MERGE_METHODS


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layers.0.w": torch.randn(6, 5, generator=g), "layers.1.w": torch.randn(6, 5, generator=g),
            "head.b": torch.randn(7, generator=g)}


# Each preset is task_vector with sparsify and consensus fixed and its paper's defaults.
PRESETS = {
    "task_arithmetic": {"sparsify": "none", "consensus": "none"},
    "ties": {"sparsify": "magnitude", "consensus": "sign", "normalize": True},
    "dare_linear": {"sparsify": "random", "consensus": "none", "rescale": True},
    "dare_ties": {"sparsify": "random", "consensus": "sign", "rescale": True},
    "breadcrumbs": {"sparsify": "breadcrumbs", "consensus": "none"},
    "breadcrumbs_ties": {"sparsify": "breadcrumbs", "consensus": "sign"},
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_is_task_vector_configured_alike(name):
    base, models = sd(0), [sd(1), sd(2), sd(3)]
    method = MERGE_METHODS.get(name)
    per_model = [{"weight": w} for w in (0.7, -0.4, 1.3)]
    shared = {"lambda": 0.8}
    if "density" in method.model_params:
        for p, d in zip(per_model, (0.3, 0.6, 0.9)):
            p["density"] = d
    if "gamma" in method.model_params:
        shared["gamma"] = 0.1
    ours = merge_state_dicts(name, models, base, parameters=shared, model_parameters=per_model, seed=5)
    general = merge_state_dicts("task_vector", models, base, parameters=shared | PRESETS[name], model_parameters=per_model, seed=5)
    assert ours.keys() == general.keys()
    for k in ours:
        assert torch.equal(ours[k], general[k]), k
    assert not torch.equal(ours["layers.0.w"], base["layers.0.w"])


def test_ft_transfer_is_task_vector_from_old_base():
    new, old, fts = sd(0), sd(1), [sd(2), sd(3)]
    ours = merge_state_dicts("ft_transfer", fts, new, extras={"old_base": old}, parameters={"lambda": 0.5})
    general = merge_state_dicts("task_vector", fts, new, extras={"old_base": old}, parameters={"lambda": 0.5})
    for k in ours:
        torch.testing.assert_close(ours[k], new[k] + 0.5 * (fts[0][k] - old[k] + fts[1][k] - old[k]), rtol=0, atol=1e-6)
        assert torch.equal(ours[k], general[k])


def test_combinations_no_preset_names_magnitude_without_consensus():
    """sparsify=magnitude without sign election: base + Σ wᵢ·topk(τᵢ), checked against a plain top-k."""
    base, models = sd(0), [sd(1), sd(2)]
    out = merge_state_dicts("task_vector", models, base, parameters={"sparsify": "magnitude", "density": 0.5},
                            model_parameters=[{"weight": 1.0}, {"weight": 0.5}])
    for k in base:
        expected = base[k].clone()
        for m, w in zip(models, (1.0, 0.5)):
            tau = (m[k] - base[k]).reshape(-1)
            keep = torch.zeros_like(tau)
            idx = tau.abs().topk(max(1, int(0.5 * tau.numel()))).indices
            keep[idx] = tau[idx]
            expected += w * keep.reshape(base[k].shape)
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


def test_task_vector_streams_with_old_base_and_consensus(tmp_path):
    tensors = {"new": 10.0, "old": 1.0, "a": 1.5, "b": 0.0}
    for name, v in tensors.items():
        save_file({"w": torch.full((3,), v)}, str(tmp_path / f"{name}.safetensors"))
    cfg = {"merge_method": "task_vector", "base_model": "new.safetensors",
           "models": [{"model": "a.safetensors"}, {"model": "b.safetensors"}],
           "parameters": {"old_base": "old.safetensors", "consensus": "sign", "normalize": True}}
    run_merge(cfg, tmp_path / "out", base_dir=tmp_path, progress=False)
    # τ = +0.5 and -1.0: the elected sign is negative, only b agrees, the disjoint mean is -1.0
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["w"].tolist() == [9.0, 9.0, 9.0]


# ---------------------------------------------------------------- Params through the registry


def test_fields_come_from_each_methods_params():
    ties = MERGE_METHODS.fields("ties")
    assert set(ties) == {"weight", "density", "lambda", "normalize", "rescale"}
    assert ties["density"]["default"] == 1.0 and "fraction" in ties["density"]["description"]
    assert MERGE_METHODS.fields("ties")["normalize"]["default"] is True
    assert MERGE_METHODS.fields("task_arithmetic")["normalize"]["default"] is False
    assert MERGE_METHODS.fields("ft_transfer")["old_base"]["required"]
    assert MERGE_METHODS.fields("greedy_soup") == {}
    assert MERGE_METHODS.get("dare_ties").options == {"lambda": 1.0, "normalize": False, "rescale": True}
    assert MERGE_METHODS.get("breadcrumbs").model_params == {"weight": 1.0, "density": 1.0, "gamma": 0.01}


@pytest.mark.parametrize(
    "params,words",
    [
        ({"sparsify": "topk"}, ["parameters: task_vector", "field 'sparsify' = 'topk'", "Accepted fields:"]),
        ({"consensus": "count"}, ["field 'consensus' = 'count'"]),
        ({"rescale": "l3"}, ["field 'rescale' = 'l3'"]),
        ({"normalize": "maybe"}, ["field 'normalize' = 'maybe'"]),
        ({"lambda": float("nan")}, ["lambda nan is out of range", "float32"]),
        ({"sparsify": "random", "density": [0.2, 0.0]}, ["density 0.0 is out of range", "(0, 1]"]),
    ],
)
def test_bad_values_are_refused_when_the_config_loads(params, words):
    cfg = {"merge_method": "task_vector", "base_model": "b", "models": [{"model": "a"}], "parameters": params}
    with pytest.raises(AttarError) as e:
        load_merge_config(cfg)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_rescale_rules_are_case_insensitive_and_int8_mask_is_a_note():
    cfg = load_merge_config({"merge_method": "dare_linear", "base_model": "b", "models": [{"model": "a"}],
                             "parameters": {"rescale": "L1", "int8_mask": True}})
    assert any("int8_mask" in n for n in cfg.notes)


def test_in_memory_merges_refuse_unknown_and_misplaced_parameters():
    base, a = sd(0), sd(1)
    with pytest.raises(AttarError, match="ties has no parameter 'densty'.*Known: density"):
        merge_state_dicts("ties", [a], base, parameters={"densty": 0.5})
    with pytest.raises(AttarError, match=r"model_parameters\[0\]: 'lambda' is a shared parameter of ties"):
        merge_state_dicts("ties", [a], base, model_parameters=[{"lambda": 2.0}])


def test_merge_models_validates_model_level_parameters():
    models = [nn.Linear(3, 2), nn.Linear(3, 2)]
    with pytest.raises(AttarError, match="iterations 2.5 is out of range.*whole number"):
        merge_models("lcsc", models, parameters={"iterations": 2.5})
    with pytest.raises(AttarError, match="field 'init' = 'first'"):
        merge_models("lcsc", models, parameters={"init": "first"})
    with pytest.raises(AttarError, match="alphas 1.5 is out of range.*\\[0, 1\\]"):
        merge_models("wise_ft", models[:1], base=models[1], parameters={"alphas": [0.5, 1.5]})
    with pytest.raises(AttarError, match="fisher has no parameter 'density'"):
        merge_models("fisher", models, parameters={"density": 0.5})
    with pytest.raises(AttarError, match="task_arithmetic has no parameter 'gamma'"):
        merge_models("task_arithmetic", models[:1], base=models[1], parameters={"gamma": 0.1})


def test_merge_stage_refuses_unknown_parameters_at_recipe_load():
    from attar.recipe import parse_recipe

    text = """\
name: bad
data: {name: digits}
stages:
  - name: a
    kind: train
    model: {arch: mlp, hidden: [8]}
  - name: b
    kind: train
    model: {arch: mlp, hidden: [8]}
  - name: soup
    kind: merge
    merge: {method: ties, base: a, models: [b], parameters: {densty: 0.5}}
"""
    with pytest.raises(AttarError, match=r"merge.parameters: ties has no parameter 'densty'"):
        parse_recipe(text, "r.yaml")
