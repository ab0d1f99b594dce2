"""mergekit-format configs: what parses, what is noted, what is refused (and how the CLI reports it)."""

from __future__ import annotations

import pytest
import yaml

from attar.errors import AttarError
from attar.merge.config import load_merge_config, resolve_parameters

# The TIES example from mergekit's README, unchanged.
MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

# The SLERP example from mergekit's README (one full-range slice).
MERGEKIT_SLERP = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
tokenizer_source: union
"""


def load(text: str, tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return load_merge_config(p)


def test_mergekit_ties_example_parses_and_resolves(tmp_path):
    cfg = load(MERGEKIT_TIES, tmp_path)
    assert cfg.merge_method == "ties" and cfg.dtype == "float16" and len(cfg.models) == 3
    assert any("int8_mask" in n for n in cfg.notes)
    settings = [m.parameters for m in cfg.models]
    opts, per = resolve_parameters(cfg.method(), "model.layers.20.mlp.up_proj.weight", 0.5, settings, cfg.parameters)
    assert opts["normalize"] is True
    assert per[0]["density"] == pytest.approx(0.7) and per[0]["weight"] == 1.0
    assert per[1]["weight"] == pytest.approx(0.5)  # 0.5 * 3 = 1.5 -> between 0.3 and 0.7
    assert per[2] == {"weight": 0.5, "density": 0.33}
    _, per = resolve_parameters(cfg.method(), "model.layers.0.self_attn.q_proj.weight", 0.0, settings, cfg.parameters)
    assert per[2]["weight"] == 0.0


def test_mergekit_slerp_slice_example_becomes_models(tmp_path):
    cfg = load(MERGEKIT_SLERP, tmp_path)
    assert [m.model for m in cfg.models] == ["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B"]
    assert cfg.layer_range == (0, 40)
    assert cfg.vocab_source is not None  # honoured when the merge runs (one shared vocabulary)
    opts, _ = resolve_parameters(cfg.method(), "model.layers.10.self_attn.k_proj.weight", 0.5, [None], cfg.parameters)
    assert opts["t"] == pytest.approx(0.3)
    opts, _ = resolve_parameters(cfg.method(), "model.norm.weight", 0.0, [None], cfg.parameters)
    assert opts["t"] == 0.5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [2, 7]}]}]}, "different lengths"),
        ({"slices": [{"sources": [{"model": "a", "layer_range": [3, 3]}]}]}, "empty"),
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"force": True}}}}, r"tokenizer.tokens.<x>.source: Field required"),
        ({"modules": {"text": {}}}, "modules.*not supported yet"),
        ({"merge_methd": "ties"}, "merge_methd: unknown key"),
        ({"models": []}, "models.*empty"),
        ({"dtype": "float8"}, "unknown dtype"),
    ],
)
def test_refused_configs(change, message):
    data = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
    data.update(change)
    if "slices" in change or "modules" in change:
        data.pop("models")
    with pytest.raises(AttarError, match=message):
        load_merge_config(data)


def test_unknown_parameter_and_method_and_misplaced_option():
    with pytest.raises(AttarError, match="ties has no parameter 'densty'.*Known: density"):
        load_merge_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"densty": 0.5}}]})
    with pytest.raises(AttarError, match="Unknown merge method 'tie'.*ties"):
        load_merge_config({"merge_method": "tie", "models": [{"model": "a"}]})
    with pytest.raises(AttarError, match="shared parameter"):
        load_merge_config({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"normalize": False}}]})
    with pytest.raises(AttarError, match="old_base"):
        load_merge_config({"merge_method": "ft_transfer", "base_model": "b", "models": [{"model": "a"}]})
    with pytest.raises(AttarError, match="rescale must be"):
        from attar.merge.methods import MERGE_METHODS

        resolve_parameters(MERGE_METHODS.get("dare_ties"), "w", 0, [None], {"rescale": "l3"})


def test_yaml_errors_are_attar_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("merge_method: [unclosed")
    with pytest.raises(AttarError, match="not valid YAML"):
        load_merge_config(p)
    p.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}]}) + "---\nmerge_method: ties\n")
    with pytest.raises(AttarError, match="2 YAML documents"):
        load_merge_config(p)
    with pytest.raises(AttarError, match="does not exist"):
        load_merge_config(tmp_path / "nope.yaml")


def test_missing_base_and_wrong_model_count_fail_before_reading(tmp_path):
    from safetensors.torch import save_file
    import torch

    from attar.merge import run_merge

    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    a = str(tmp_path / "a.safetensors")
    with pytest.raises(AttarError, match="needs `base_model`"):
        run_merge({"merge_method": "ties", "models": [{"model": a}]}, tmp_path / "o", progress=False)
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(AttarError, match="exactly 1 model"):
        run_merge(
            {"merge_method": "slerp", "base_model": a, "models": [{"model": str(tmp_path / "b.safetensors")}, {"model": str(tmp_path / "c.safetensors")}]},
            tmp_path / "o",
            progress=False,
        )
    with pytest.raises(AttarError, match="held-out data"):
        run_merge({"merge_method": "greedy_soup", "models": [{"model": a}]}, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_merge_command_and_typer_app(tmp_path):
    from safetensors.torch import load_file, save_file
    import torch
    from typer.testing import CliRunner

    from attar.cli import app
    from attar.cli.merge import merge_command

    save_file({"w": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": 3 * torch.ones(2)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "m.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\ntokenizer_source: base\n"
    )
    res = merge_command(tmp_path / "m.yaml", tmp_path / "out1", dtype="fp16", quiet=True)
    assert res.tensors == 1 and load_file(str(tmp_path / "out1" / "model.safetensors"))["w"].dtype == torch.float16
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "out2")], env={"CI": "true"})
    assert result.exit_code == 0, result.output
    assert "note:" in result.output and "linear" in result.output
    assert torch.equal(load_file(str(tmp_path / "out2" / "model.safetensors"))["w"], 2 * torch.ones(2))
    listing = CliRunner().invoke(app, ["methods", "merge"]).output + \
        CliRunner().invoke(app, ["methods", "merge-data"]).output
    assert "greedy_soup" in listing and "ties" in listing
