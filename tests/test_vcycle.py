"""V-cycle multi-level training (train.growth: {method: v_cycle}): the coalescing, de-coalescing and interpolation
operators against hand-derived values, a recipe stage run through the cycle end to end, a run killed mid-cycle and
resumed equal to an uninterrupted one, and the settings that cannot apply refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import attar.stages.lm as lm_stage
from attar.errors import AttarError
from attar.pipeline import Pipeline
from attar.recipe import load_recipe
from attar.text.charlm import load_causal_lm, make_byte_lm
from attar.train.config import TrainConfig, VCycleConfig
from attar.train.vcycle import coalesce, decoalesce, interpolate, phases
from test_efficient_lm import _corpus

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

BYTE = {"layers": 4, "d_model": 16, "heads": 2, "context": 96}
TRAIN = {"steps": 4, "batch_size": 8, "lr": 5e-3, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 0}
CYCLE = {"method": "v_cycle", "levels": 2, "alpha": 0.25, "steps": [3, 4]}


def _lm(layers: int, seed: int):
    return make_byte_lm(layers=layers, d_model=16, heads=2, context=64, seed=seed)


def _block(model, i: int) -> dict[str, torch.Tensor]:
    return model.transformer.h[i].state_dict()


# ---------------------------------------------------------------- the operators


def test_coalesce_then_decoalesce_puts_the_pair_average_in_both_places():
    big = _lm(2, 0)
    small = coalesce(big)
    assert len(small.transformer.h) == 1 and small.config.n_layer == 1 and len(big.transformer.h) == 2
    b0, b1 = _block(big, 0), _block(big, 1)
    for k, v in _block(small, 0).items():
        assert torch.equal(v, (b0[k] + b1[k]) / 2), k
    d = decoalesce(small, big)
    for i in (0, 1):
        for k in b0:
            assert torch.equal(d[f"transformer.h.{i}.{k}"], (b0[k] + b1[k]) / 2), (i, k)
    for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert torch.equal(d[k], big.state_dict()[k])  # outside the blocks: copied through both operators
    assert torch.equal(_block(big, 0)["attn.c_attn.weight"], b0["attn.c_attn.weight"])  # C left its input alone


def test_decoalesce_of_a_model_with_equal_adjacent_blocks_is_that_model_exactly():
    """D(C(w)) = w (weights and function) when blocks 2i and 2i+1 of w are equal; C(D(s)) = s for any s."""
    big = _lm(4, 1)
    for i in (0, 2):
        big.transformer.h[i + 1].load_state_dict(_block(big, i))
    small = coalesce(big)
    rebuilt = _lm(4, 2)
    rebuilt.load_state_dict(decoalesce(small, rebuilt))
    assert all(torch.equal(v, big.state_dict()[k]) for k, v in rebuilt.state_dict().items())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(ids).logits, big.eval()(ids).logits)
        # depth de-coalescing does not preserve the small model's function: each of its blocks now runs twice
        assert not torch.allclose(rebuilt(ids).logits, small.eval()(ids).logits, atol=1e-3)
    s = _lm(2, 3)
    again = coalesce(_load(_lm(4, 4), decoalesce(s, _lm(4, 4))))
    assert all(torch.equal(v, s.state_dict()[k]) for k, v in again.state_dict().items())


def _load(model, state):
    model.load_state_dict(state)
    return model


def test_interpolation_alpha_0_keeps_the_large_model_and_alpha_1_gives_the_decoalesced_one():
    big, small = _lm(4, 0), _lm(2, 1)
    w, d = {k: v.clone() for k, v in big.state_dict().items()}, decoalesce(small, big)
    zero, one, quarter = interpolate(w, d, 0.0), interpolate(w, d, 1.0), interpolate(w, d, 0.25)
    for k in w:
        assert torch.equal(zero[k], w[k]) and torch.equal(one[k], d[k]), k
        assert torch.allclose(quarter[k], 0.75 * w[k] + 0.25 * d[k], atol=0, rtol=1e-6), k
    assert torch.equal(quarter["transformer.h.3.mlp.c_fc.weight"],
                       0.75 * w["transformer.h.3.mlp.c_fc.weight"] + 0.25 * small.state_dict()["transformer.h.1.mlp.c_fc.weight"])


def test_phases_run_down_the_levels_and_back_up():
    p = phases(VCycleConfig(levels=3, steps=[5, 6, 7, 8]), 9)
    assert [(x.level, x.way, x.steps) for x in p] == [(0, "down", 5), (1, "down", 6), (2, "bottom", 7), (1, "up", 8),
                                                      (0, "last", 9)]


@pytest.mark.parametrize("growth,message", [
    ({"method": "v_cycle", "steps": [3]}, "lists the 2 phases before the last for levels 2"),
    ({"method": "v_cycle", "levels": 3, "steps": [3, 4]}, "lists the 4 phases"),
    ({"method": "v_cycle", "steps": [3, 0]}, "greater than or equal to 1"),
    ({"method": "v_cycle", "steps": [3, 4], "alpha": 1.5}, "alpha"),
    ({"method": "v_cycle", "steps": [3, 4], "from": "small"}, "from"),
    ({"method": "w_cycle", "steps": [3, 4]}, "'w_cycle' .* does not match any of the expected tags: 'g_stack', 'v_cycle'"),
])
def test_bad_cycle_settings_are_refused_naming_the_field(growth, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(growth=growth)


# ---------------------------------------------------------------- a recipe stage through the cycle


def _recipe(tmp_path: Path, train: dict | None = None, model: dict | None = None, kind: str = "train") -> Path:
    data = {"name": str(_corpus(tmp_path / "corpus.txt")), "max_len": 48}
    stage = {"name": "s", "kind": kind, "model": model or {"byte": BYTE}, "data": data,
             "train": TRAIN | {"growth": CYCLE} | (train or {})}
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"name": "vcycle", "seed": 3, "stages": [stage]}))
    return r


def _run(recipe: Path, home: Path, resume: Path | None = None) -> Path:
    return Pipeline(*load_recipe(recipe), home=home, log=lambda *a, **k: None).run(resume)


def test_recipe_stage_runs_the_cycle_and_writes_the_full_size_model(tmp_path):
    run = _run(_recipe(tmp_path), tmp_path / "h")
    model, _ = load_causal_lm(run / "s" / "model")
    assert len(model.transformer.h) == 4
    saved = json.loads((run / "s" / "lm-metrics.json").read_text())
    cycle, metrics = saved["vcycle"], saved["metrics"]
    assert [(r["way"], r["layers"], r["steps"]) for r in cycle] == [("down", 4, 3), ("bottom", 2, 4), ("last", 4, 4)]
    width = 48  # rows of max_len tokens (prompt + continuation), padded to the split's width
    per_step = cycle[0]["tokens"] // 3
    assert per_step % TRAIN["batch_size"] == 0 and per_step // TRAIN["batch_size"] <= width
    assert [r["tokens"] for r in cycle] == [3 * per_step, 4 * per_step, 4 * per_step]
    assert cycle[1]["params"] < cycle[0]["params"] == cycle[2]["params"] == metrics["params"]
    assert metrics["vcycle_steps"] == 11 and metrics["vcycle_tokens"] == 11 * per_step and metrics["steps"] == 4
    assert metrics["test_ppl"] < 258  # trained: better than uniform bytes
    assert sorted(p.name for p in (run / "s" / "vcycle").iterdir()) == [
        "phase-0.json", "phase-0.safetensors", "phase-1.json", "phase-1.safetensors"]  # phase checkpoints removed


def test_the_cycle_changes_the_result_and_alpha_0_ignores_the_small_level(tmp_path):
    """alpha 0: the last phase starts from level 0's own weights, so the half-depth phase cannot matter (its
    step count changes nothing); alpha 0.25 brings it in."""
    def final(train, name):
        (tmp_path / name).mkdir()
        run = _run(_recipe(tmp_path / name, train), tmp_path / name / "h")
        return load_file(run / "s" / "model" / "model.safetensors")

    a = final({"growth": CYCLE | {"alpha": 0.0}}, "a")
    b = final({"growth": CYCLE | {"alpha": 0.0, "steps": [3, 1]}}, "b")
    c = final({"growth": CYCLE}, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class Stop(Exception):
    pass


@pytest.mark.parametrize("phase,step", [(1, 2), (2, 2)])
def test_a_run_killed_mid_cycle_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, phase, step):
    recipe = _recipe(tmp_path)
    ref = _run(recipe, tmp_path / "ref")
    real, fired, seen = lm_stage.distill_lm, [], []

    def stopping(*a, on_metrics=None, ckpt_dir=None, **k):
        here = 2 if Path(ckpt_dir).name == "checkpoints" else int(Path(ckpt_dir).name.split("-")[1])

        def stop(s, rec):
            if on_metrics is not None:
                on_metrics(s, rec)
            seen.append((here, s))
            if here == phase and s == step and not fired:
                fired.append((here, s))
                raise Stop
        return real(*a, on_metrics=stop, ckpt_dir=ckpt_dir, **k)

    monkeypatch.setattr(lm_stage, "distill_lm", stopping)
    home = tmp_path / "stopped"
    with pytest.raises(Stop):
        _run(recipe, home)
    assert fired == [(phase, step)]
    run_dir = next(p for p in home.iterdir() if (p / "run.json").exists())
    assert (run_dir / "s" / "vcycle" / "phase-0.safetensors").exists()
    seen.clear()
    _run(recipe, home, resume=run_dir)
    # resumed, not retrained: finished phases are loaded, the stopped one continues after its step-2 checkpoint
    assert seen and all(p >= phase for p, _ in seen) and (phase, 1) not in seen
    a = load_file(ref / "s" / "model" / "model.safetensors")
    b = load_file(run_dir / "s" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((r / "s" / "lm-metrics.json").read_text())["vcycle"] for r in (ref, run_dir))
    assert [{k: v for k, v in r.items()} for r in ra] == rb


@pytest.mark.parametrize("train,model,kind,message", [
    ({}, {"byte": BYTE | {"layers": 3}}, "train", "must be a multiple of 2"),
    ({"growth": CYCLE | {"levels": 3, "steps": [2, 2, 2, 2]}}, {"byte": BYTE | {"layers": 2}}, "train",
     "multiple of 4"),
    ({}, {"byte": BYTE, "lora": {"rank": 2}}, "train", "give a fresh model"),
    ({}, {"byte": BYTE, "parameterization": {"sltrain": {"rank": 4, "sparsity": 0.9}}}, "train", "do not average"),
    ({"sparsity": {"dense_from": 2}}, None, "train", "SPDF's masks belong to one model"),
])
def test_settings_that_cannot_apply_are_refused_before_anything_trains(tmp_path, train, model, kind, message):
    with pytest.raises((AttarError, ValueError), match=message):
        _run(_recipe(tmp_path, train, model, kind), tmp_path / "h")
    assert not list((tmp_path / "h").glob("*/*/model/config.json"))


def test_an_image_model_stage_refuses_the_cycle_by_name(tmp_path):
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"name": "v", "data": {"name": "digits"}, "stages": [
        {"name": "m", "kind": "train", "model": {"arch": "mlp"}, "train": {"epochs": 1, "growth": CYCLE}}]}))
    with pytest.raises(AttarError, match="train.growth v_cycle trains causal language models"):
        _run(r, tmp_path / "h")


def _llama_folder(path: Path, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from attar.text.charlm import byte_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
                     ).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_a_fresh_hf_llama_config_runs_the_cycle_and_its_half_depth_copy_generates(tmp_path):
    """Llama's blocks carry their KV-cache index: the coalesced copy renumbers them (it generates with a cache)."""
    from transformers import AutoModelForCausalLM

    folder = _llama_folder(tmp_path / "llama", 4)
    small = coalesce(AutoModelForCausalLM.from_pretrained(folder))
    assert small.config.num_hidden_layers == 2 and [b.self_attn.layer_idx for b in small.model.layers] == [0, 1]
    out = small.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (1, 7)
    run = _run(_recipe(tmp_path, model={"hf": str(folder)}), tmp_path / "h")
    assert AutoModelForCausalLM.from_pretrained(run / "s" / "model").config.num_hidden_layers == 4
    cycle = json.loads((run / "s" / "lm-metrics.json").read_text())["vcycle"]
    assert [r["layers"] for r in cycle] == [4, 2, 4]


def test_an_hf_model_of_odd_depth_is_refused_when_the_stage_starts(tmp_path):
    folder = _llama_folder(tmp_path / "llama", 3)
    with pytest.raises(AttarError, match="train.growth.levels: 2 levels halve the depth 1 times, so the model's 3 "
                                         "blocks must be a multiple of 2"):
        _run(_recipe(tmp_path, model={"hf": str(folder)}), tmp_path / "h")
