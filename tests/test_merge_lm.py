"""Merging causal LMs in a recipe (``merge`` of causal-LM stages, attar.stages.lm_merge / attar.merge.lm):
a tiny SmolLM2-shaped Llama fine-tuned a few steps on two tiny texts, merged by linear, RegMean, greedy soup, and
its LoRA adapters merged into one PEFT adapter; each checked against values computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from attar.distill.lm import perplexity
from attar.errors import AttarError
from attar.pipeline import Pipeline
from attar.recipe import load_recipe, parse_recipe
from attar.text.charlm import lm_packed_data, load_causal_lm

SMOL = Path(__file__).resolve().parents[1] / "runs" / "models" / "smollm2-135m"
pytestmark = pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer not present")

A_WORDS = ["river", "stone", "rain", "moss", "cliff", "tide", "wind", "reed"]
B_WORDS = ["ledger", "court", "tax", "senate", "budget", "law", "vote", "union"]
MAX_LEN = 24


def _text(path: Path, words: list[str], seed: int, n: int = 160) -> str:
    g = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        w = [words[int(j)] for j in torch.randint(0, len(words), (5,), generator=g)]
        lines.append(f"The {w[0]} and the {w[1]} met the {w[2]} by the {w[3]}, {i} times {w[4]}.")
    path.write_text("\n".join(lines))
    return str(path)


def tiny_smol(path: Path, seed: int = 0) -> str:
    """A SmolLM2-shaped Llama (tied embeddings, SmolLM2's tokenizer), 2 layers of width 16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(SMOL).save_pretrained(path)
    return str(path)


def _ft(name: str, base: str, text: str, lora: bool = False, seed: int = 0) -> dict:
    model = {"hf": base} | ({"lora": {"rank": 2, "alpha": 4}} if lora else {})
    return {"name": name, "kind": "finetune", "model": model, "seed": seed,
            "data": {"name": text, "pack": True, "max_len": MAX_LEN},
            "train": {"steps": 3, "batch_size": 4, "lr": 0.05 if lora else 0.02, "warmup_steps": 0, "eval_every": 3}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One recipe: two full fine-tunes and two LoRA fine-tunes of one tiny base, merged five ways, and an LM stage
    that keeps training the linear merge."""
    tmp = tmp_path_factory.mktemp("lm-merge")
    base = tiny_smol(tmp / "base")
    a, b = _text(tmp / "a.txt", A_WORDS, 1), _text(tmp / "b.txt", B_WORDS, 2)
    stages = [
        _ft("ft_a", base, a), _ft("ft_b", base, b, seed=1),
        {"name": "lin", "kind": "merge", "merge": {"method": "linear", "models": ["ft_a", "ft_b"],
                                                   "model_parameters": [{"weight": 3}, {"weight": 1}]}},
        {"name": "rm", "kind": "merge", "merge": {"method": "regmean", "models": ["ft_a", "ft_b"],
                                                  "parameters": {"alpha": 0.9, "examples": 8, "batch_size": 3}}},
        {"name": "soup", "kind": "merge", "merge": {"method": "greedy_soup", "models": ["ft_a", "ft_b"]}},
        _ft("lo_a", base, a, lora=True), _ft("lo_b", base, b, lora=True, seed=1),
        {"name": "lo_ta", "kind": "merge", "merge": {"method": "task_arithmetic", "base": {"hf": base},
                                                     "models": ["lo_a", "lo_b"],
                                                     "model_parameters": [{"weight": 0.7}, {"weight": 0.5}]}},
        {"name": "lo_ties", "kind": "merge", "merge": {"method": "ties", "base": {"hf": base}, "models": ["lo_a", "lo_b"],
                                                       "parameters": {"density": 0.5}}},
        {"name": "more", "kind": "finetune", "model": {"stage": "lin"}, "data": {"name": a, "pack": True, "max_len": MAX_LEN},
         "train": {"steps": 1, "batch_size": 2, "eval_every": 1}},
    ]
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "lm-merge", "seed": 0, "stages": stages}))
    out = Pipeline(*load_recipe(path), home=tmp / "home", log=lambda *a, **k: None).run()
    return {"dir": out, "base": base, "a": a, "b": b, "tmp": tmp}


def _sd(run, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(run["dir"] / stage / "model" / "model.safetensors"))


def _metrics(run, stage: str) -> dict:
    return json.loads((run["dir"] / stage / "lm-metrics.json").read_text())["metrics"]


def _splits(run, text: str):
    _, tok = load_causal_lm(run["base"])
    return lm_packed_data(text, tok, MAX_LEN)


def test_linear_merge_of_two_finetunes_is_the_weighted_average_of_their_weights(run):
    a, b, m = _sd(run, "ft_a"), _sd(run, "ft_b"), _sd(run, "lin")
    assert set(m) == set(a)
    moved = 0
    for k in a:
        torch.testing.assert_close(m[k], 0.75 * a[k] + 0.25 * b[k], rtol=0, atol=1e-6)
        moved += int(not torch.equal(a[k], b[k]))
    assert moved > 5  # the fine-tunes really differ, so the average is a real test
    # the merged folder is a causal-LM stage output: tokenizer written, and a later LM stage trained from it
    assert (run["dir"] / "lin" / "model" / "tokenizer.json").is_file()
    assert (run["dir"] / "more" / "model" / "config.json").is_file()


def test_per_domain_test_perplexity_is_reported_and_matches_a_direct_evaluation(run):
    met = _metrics(run, "lin")
    merged, _ = load_causal_lm(run["dir"] / "lin" / "model")
    own = {"ft_a": (run["a"], "ft_a"), "ft_b": (run["b"], "ft_b")}
    for name, (text, stage) in own.items():
        data = _splits(run, text)
        ppl = perplexity(merged, data.test, data.pad_id)
        assert met[f"test_ppl[{name}]"] == pytest.approx(ppl, rel=1e-5)
        src, _ = load_causal_lm(run["dir"] / stage / "model")
        assert met[f"ppl_rise[{name}]"] == pytest.approx(ppl - perplexity(src, data.test, data.pad_id), rel=1e-4)
    assert met["test_ppl"] == pytest.approx((met["test_ppl[ft_a]"] + met["test_ppl[ft_b]"]) / 2)


def test_regmean_on_lms_equals_the_closed_form_on_one_layer_by_hand(run):
    alpha, rows = 0.9, 8
    layer = "model.layers.1.mlp.down_proj"
    ws, gs = [], []
    for stage, text in (("ft_a", run["a"]), ("ft_b", run["b"])):
        model, _ = load_causal_lm(run["dir"] / stage / "model")
        seen = []
        h = model.get_submodule(layer).register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, 32)))
        data = _splits(run, text)
        ids = data.train.slice(0, rows).ids
        real = ids != data.pad_id  # attar's convention: pad-id tokens are masked out (and left out of the Grams)
        assert 0 < int((~real).sum()) < 20
        with torch.no_grad():
            model(input_ids=ids, attention_mask=real.long())
        h.remove()
        x = torch.cat(seen)[real.reshape(-1)].double()
        g = x.T @ x / len(x)
        gs.append(alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)))
        ws.append(model.get_submodule(layer).weight.detach().double())
    want = sum(w @ g for w, g in zip(ws, gs)) @ torch.linalg.inv(sum(gs))
    got = _sd(run, "rm")[f"{layer}.weight"].double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=5e-5)  # float32 Grams, batches of 3 rows vs one of 8
    assert float((got - (ws[0] + ws[1]) / 2).abs().max()) > 1e-2  # far from the plain average
    # the tied head/embedding table is averaged, not solved for (it is the input embedding too)
    a, b, m = _sd(run, "ft_a"), _sd(run, "ft_b"), _sd(run, "rm")
    torch.testing.assert_close(m["model.embed_tokens.weight"], (a["model.embed_tokens.weight"] + b["model.embed_tokens.weight"]) / 2)


def test_greedy_soup_never_keeps_an_ingredient_that_raises_mean_validation_perplexity(run):
    from attar.merge.lm import merge_lms

    models = [load_causal_lm(run["dir"] / s / "model")[0] for s in ("ft_a", "ft_b")]
    ruined = load_causal_lm(run["dir"] / "ft_a" / "model")[0]
    with torch.no_grad():
        for p in ruined.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    da, db = _splits(run, run["a"]), _splits(run, run["b"])
    val = {"a": da.val, "b": db.val}

    def mean_val(m):
        return sum(perplexity(m, s, da.pad_id) for s in val.values()) / 2

    soup, info = merge_lms("greedy_soup", [ruined, *models], val=val, pad_id=da.pad_id)
    assert 0 not in info["ingredients"]  # the ruined one is never in the soup
    best = -info["history"][0]["score"]
    for step in info["history"][1:]:  # every kept step lowers (or keeps) the mean validation perplexity
        if step["kept"]:
            assert -step["score"] <= best
            best = -step["score"]
    assert mean_val(soup) == pytest.approx(best, rel=1e-5)
    assert mean_val(soup) <= min(mean_val(m) for m in [ruined, *models]) + 1e-9
    # the recipe's soup reports which stages it kept
    met = json.loads((run["dir"] / "soup" / "lm-metrics.json").read_text())["metrics"]
    assert met["kept"] and set(met["kept"].split(", ")) <= {"ft_a", "ft_b"}


def test_lora_adapters_merge_into_one_peft_adapter_equal_to_the_merged_deltas(run):
    from peft import PeftModel

    base, _ = load_causal_lm(run["base"])
    folder = run["dir"] / "lo_ta" / "adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4  # two rank-2 adapters, ranks concatenated
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    got = merged.state_dict()
    full = _sd(run, "lo_ta")  # the task-arithmetic merge of the full models
    for k, v in full.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=2e-6)
    # the delta, by hand from the two source adapters: 0.7 s B_a A_a + 0.5 s B_b A_b (s = alpha / r = 2)
    key = "model.layers.0.self_attn.q_proj"
    ad = [load_file(str(run["dir"] / s / "adapter" / "adapter_model.safetensors")) for s in ("lo_a", "lo_b")]
    pre = f"base_model.model.{key}"
    want = sum(c * 2.0 * d[f"{pre}.lora_B.weight"] @ d[f"{pre}.lora_A.weight"] for c, d in zip((0.7, 0.5), ad))
    b0 = load_causal_lm(run["base"])[0].state_dict()[f"{key}.weight"]
    torch.testing.assert_close(full[f"{key}.weight"] - b0, want, rtol=0, atol=2e-6)
    assert float(want.abs().max()) > 1e-4
    # TIES is not linear in the deltas: the full merge only, no adapter
    assert (run["dir"] / "lo_ties" / "model" / "config.json").is_file()
    assert not (run["dir"] / "lo_ties" / "adapter").exists()


@pytest.mark.parametrize("merge, match", [
    ({"method": "fisher", "models": ["ft"]}, "written for image classifiers.*regmean"),
    ({"method": "task_arithmetic", "models": ["ft"]}, "needs merge.base"),
    ({"method": "linear", "models": ["ft"], "base": {"byte": {"layers": 1}}}, "merge.base: give a trained model"),
])
def test_lm_merge_mistakes_are_refused_at_load_with_the_field(tmp_path, merge, match):
    text = str(tmp_path / "t.txt")
    recipe = {"stages": [{"name": "ft", "kind": "finetune", "model": {"pretrained": "smollm2-135m"},
                          "data": {"name": text, "pack": True}},
                         {"name": "m", "kind": "merge", "merge": merge}]}
    with pytest.raises(AttarError, match=match):
        parse_recipe(yaml.safe_dump(recipe))


def test_a_merge_stage_of_image_models_is_unchanged(tmp_path):
    recipe = parse_recipe(yaml.safe_dump({"data": {"name": "digits"}, "stages": [
        {"name": "a", "kind": "train", "model": {"arch": "mlp"}},
        {"name": "m", "kind": "merge", "merge": {"method": "linear", "models": ["a"]}}]}))
    assert recipe.stages[1].kind_spec().__name__ == "MergeStage"


def test_an_lm_merge_naming_an_image_stage_fails_in_preflight_naming_it(tmp_path):
    base = tiny_smol(tmp_path / "base")
    text = _text(tmp_path / "a.txt", A_WORDS, 1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "img", "kind": "train", "model": {"arch": "mlp"}, "data": {"name": "digits"}},
        _ft("ft", base, text),
        {"name": "m", "kind": "merge", "merge": {"method": "linear", "models": ["ft", "img"]}}]}))
    with pytest.raises(AttarError, match="stage 'img' is a train stage of an image or table model"):
        Pipeline(*load_recipe(path), home=tmp_path / "home", log=lambda *a, **k: None).preflight()
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").glob("2*"))


def test_a_merge_of_a_merge_is_refused_in_preflight(tmp_path):
    base = tiny_smol(tmp_path / "base")
    text = _text(tmp_path / "a.txt", A_WORDS, 1)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [
        _ft("ft", base, text),
        {"name": "m1", "kind": "merge", "merge": {"method": "linear", "models": ["ft"]}},
        {"name": "m2", "kind": "merge", "merge": {"method": "linear", "models": ["m1", "ft"]}}]}))
    with pytest.raises(AttarError, match="stage 'm1' is itself a merge"):
        Pipeline(*load_recipe(path), home=tmp_path / "home", log=lambda *a, **k: None).preflight()
