"""tokenizer.tokens (per-token row sources, mergekit's schema) and tokens listed past a model's vocabulary rows,
attar.merge.vocab. Expected rows are read from the input checkpoints here, never from attar."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attar.errors import AttarError
from attar.merge import run_merge

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
WORDS = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 16)]


def make(path: Path, seed: int, rows: int, added: list[str]) -> dict[str, torch.Tensor]:
    """A 1-layer Llama with ``rows`` vocabulary rows (untied head) and a 16-token BPE tokenizer plus ``added``."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)).save_pretrained(path)
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(WORDS, range(16))), "merges": []}, "added_tokens": []}
    with tempfile.TemporaryDirectory() as d:
        Tokenizer.from_str(json.dumps(data)).save(f"{d}/tokenizer.json")
        tok = PreTrainedTokenizerFast(tokenizer_file=f"{d}/tokenizer.json", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added)
    tok.save_pretrained(path)
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_tokens")
    sd = {"a": make(root / "a", 0, 16, []),
          "b": make(root / "b", 1, 18, ["<|im_start|>", "<|im_end|>"]),  # a chat fine-tune: 2 added rows
          "padded": make(root / "padded", 2, 16, [f"<UNUSED_{i}>" for i in range(4)])}  # 4 tokens past its rows
    return root, sd


def merge(root: Path, out: str, models: list[str], tokenizer: dict, base: str = "a", **extra):
    cfg = {"merge_method": "linear", "base_model": base, "dtype": "float32", "tokenizer": tokenizer,
           "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models]} | extra
    res = run_merge(cfg, root / out, base_dir=root, progress=False)
    return load_file(str(root / out / "model.safetensors")), res


def vocab(path: Path) -> dict[str, int]:
    data = json.loads((path / "tokenizer.json").read_text())
    return dict(data["model"]["vocab"]) | {t["content"]: t["id"] for t in data["added_tokens"]}


def test_forced_tokens_take_the_chosen_models_rows_and_the_rest_is_the_plain_merge(models):
    root, sd = models
    a, b = sd["a"], sd["b"]
    out, res = merge(root, "forced", ["a", "b"], {"source": "union", "tokens": {
        "_tok_10": {"source": "b", "force": True}, "_tok_11": {"source": "a", "force": True}}})
    v = vocab(root / "forced")
    assert v["_tok_10"] == 10 and v["<|im_start|>"] == 16 and len(v) == 18
    for name in (EMB, HEAD):
        assert out[name].shape == (18, 8)
        assert torch.equal(out[name][10], b[name][10])  # forced from b in both inputs: 0.5 r + 0.5 r = r exactly
        assert torch.equal(out[name][11], a[name][11])
        assert torch.equal(out[name][16:], b[name][16:])  # only b has the chat tokens: its rows (no tokens entry)
        others = [i for i in range(16) if i not in (10, 11)]
        torch.testing.assert_close(out[name][others], 0.5 * a[name][others] + 0.5 * b[name][others], rtol=0, atol=1e-7)
    assert "'_tok_10' forced from b" in res.notes[-1]


def test_model_token_rows_by_id_and_by_token_into_the_base_vocabulary(models):
    root, sd = models
    a, b = sd["a"], sd["b"]
    out, _ = merge(root, "by_id", ["a", "b"], {"source": "base", "tokens": {
        "_tok_12": {"source": {"kind": "model_token", "model": "b", "token_id": 16}, "force": True},  # b's <|im_start|>
        "_tok_13": {"source": {"kind": "model_token", "model": "a", "token": "<s>"}, "force": True}}})
    assert len(vocab(root / "by_id")) == 16
    for name in (EMB, HEAD):
        assert out[name].shape == (16, 8)
        assert torch.equal(out[name][12], b[name][16])
        assert torch.equal(out[name][13], a[name][1])
        torch.testing.assert_close(out[name][14], 0.5 * a[name][14] + 0.5 * b[name][14], rtol=0, atol=1e-7)


def test_an_unforced_source_fills_only_the_inputs_that_lack_the_token(models):
    root, sd = models
    b = sd["b"]
    zero = {"kind": "zero"}
    out, _ = merge(root, "unforced", ["a", "b"], {"source": "union", "tokens": {"<|im_start|>": {"source": zero},
                                                                                 "_tok_5": {"source": zero}}})
    forced, _ = merge(root, "forced_zero", ["a", "b"], {"source": "union", "tokens": {"<|im_start|>": {"source": zero, "force": True}}})
    plain, _ = merge(root, "plain", ["a", "b"], {"source": "union"})
    for name in (EMB, HEAD):
        assert torch.equal(plain[name][16], b[name][16])  # default: a's missing row is filled from b, so b's row
        torch.testing.assert_close(out[name][16], 0.5 * b[name][16], rtol=0, atol=0)  # a's row is zeros now
        assert torch.equal(out[name][5], plain[name][5])  # both have _tok_5: an unforced source changes nothing
        assert not forced[name][16].any()
        assert torch.equal(forced[name][:16], plain[name][:16]) and torch.equal(forced[name][17], plain[name][17])


def test_padding_rows_are_the_mean_after_forced_rows(models):
    root, sd = models
    out, _ = merge(root, "pad", ["a", "b"], {"source": "union", "pad_to_multiple_of": 8,
                                             "tokens": {"_tok_3": {"source": {"kind": "zero"}, "force": True}}})
    for name in (EMB, HEAD):
        assert out[name].shape == (24, 8) and not out[name][3].any()
        torch.testing.assert_close(out[name][18:], out[name][:18].mean(0).expand(6, 8), rtol=0, atol=1e-6)


def test_tokens_listed_past_a_models_rows_are_dropped(models):
    root, sd = models
    out, res = merge(root, "union3", ["a", "padded", "b"], {"source": "union"})
    v = vocab(root / "union3")
    assert len(v) == 18 and out[EMB].shape == (18, 8) and not any(t.startswith("<UNUSED") for t in v)
    assert "padded's 4 tokens past its rows dropped" in res.notes[-1]
    # the padded model as the base of a base vocabulary: its own tokenizer files lose the 4 tokens
    out, _ = merge(root, "base_padded", ["padded", "a"], {"source": "base"}, base="padded")
    v = vocab(root / "base_padded")
    assert v == dict(zip(WORDS, range(16))) and out[EMB].shape == (16, 8)
    decoder = json.loads((root / "base_padded" / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {})
    assert all(int(i) < 16 for i in decoder)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(root / "base_padded")) == 16
    torch.testing.assert_close(out[EMB], 0.5 * sd["padded"][EMB] + 0.5 * sd["a"][EMB], rtol=0, atol=1e-7)


@pytest.mark.parametrize("tokens, message", [
    ({"_tok_99": {"source": "a", "force": True}}, r"tokenizer.tokens\['_tok_99'\]: the output vocabulary .* has no token"),
    ({"_tok_10": {"source": "c", "force": True}}, r"tokenizer.tokens\['_tok_10'\].source: 'c' is not one of the merged models"),
    ({"<|im_end|>": {"source": "a", "force": True}}, r"tokenizer.tokens\['<\|im_end\|>'\].source: a has no token"),
    ({"_tok_4": {"source": {"kind": "model_token", "model": "a", "token_id": 16}}}, r"\.source\.token_id: 16 is out of range for a"),
    ({"_tok_4": {"source": {"kind": "model_token", "model": "b", "token": "<x>"}}}, r"\.source\.token: b's tokenizer has no token '<x>'"),
    ({"_tok_4": {"source": {"kind": "model_token", "model": "nope", "token_id": 0}}}, r"\.source\.model: 'nope' is not one of"),
    ({"_tok_4": {"source": {"kind": "model_token", "model": "a", "token_id": 1, "token": "<s>"}}}, "exactly one of `token_id` and `token`"),
    ({"_tok_4": {"force": True}}, r"tokenizer.tokens._tok_4.source: Field required"),
    ({"_tok_4": {"source": {"kind": "mean"}}}, r"tokenizer.tokens._tok_4.source: a token's source is"),
])
def test_bad_token_settings_are_refused_by_field(models, tokens, message):
    root, _ = models
    with pytest.raises(AttarError, match=message):
        merge(root, "bad", ["a", "b"], {"source": "union", "tokens": tokens})
    assert not (root / "bad").exists()
