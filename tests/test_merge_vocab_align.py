"""Merging models whose vocabularies differ (tokenizer_source: union | base | model), attar.merge.vocab."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attar.errors import AttarError
from attar.merge import run_merge

SMOL = Path(__file__).resolve().parents[1] / "runs" / "models" / "smollm2-135m"
needs_smol = pytest.mark.skipif(not (SMOL / "tokenizer.json").is_file(), reason="SmolLM2 tokenizer not present")
TEXT = "Merging <|im_start|> vocabularies\n  by token string, ĠĊ é 東京"
ADDED = [f"<tool_{i}>" for i in range(8)]  # 49,152 -> 49,160 tokens, as a chat fine-tune adds


def tiny_smol(path: Path, seed: int) -> None:
    """A SmolLM2-shaped Llama (tied embeddings, SmolLM2's 49,152-token tokenizer), 2 layers of width 16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(SMOL).save_pretrained(path)


def logits(path: Path, text: str = TEXT) -> tuple[torch.Tensor, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0], ids


def permuted_copy(src: Path, dst: Path, perm: torch.Tensor) -> None:
    """``src`` with its vocabulary re-ordered: old id i becomes perm[i] (tokenizer files and embedding rows)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    p = perm.tolist()
    data["model"]["vocab"] = {t: p[i] for t, i in data["model"]["vocab"].items()}
    for tok in data["added_tokens"]:
        tok["id"] = p[tok["id"]]
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(p[int(i)]): v for i, v in cfg.get("added_tokens_decoder", {}).items()}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    sd = load_file(str(dst / "model.safetensors"))
    emb = sd["model.embed_tokens.weight"]
    new = torch.empty_like(emb)
    new[perm] = emb
    sd["model.embed_tokens.weight"] = new
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


@needs_smol
def test_a_model_merged_with_itself_under_a_permuted_vocabulary_is_the_model(tmp_path):
    tiny_smol(tmp_path / "a", seed=0)
    perm = torch.randperm(49152, generator=torch.Generator().manual_seed(1))
    permuted_copy(tmp_path / "a", tmp_path / "b", perm)
    want, ids = logits(tmp_path / "a")
    got_b, ids_b = logits(tmp_path / "b")
    assert ids_b == perm[ids].tolist() and torch.equal(got_b[:, perm], want)  # the permuted copy is the same model
    for source, base in (("union", "a"), ("base", "b"), ("b", None), (f"model:{tmp_path / 'b'}", None)):
        cfg = {"merge_method": "linear", "tokenizer_source": source,
               "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}
        if base:
            cfg["base_model"] = base
        out = tmp_path / f"out_{len(source)}"
        res = run_merge(cfg, out, base_dir=tmp_path, progress=False)
        got, out_ids = logits(out)
        if source == "union":  # output ids are a's: same ids, same logits, bit for bit
            assert out_ids == ids and torch.equal(got, want)
            assert torch.equal(load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"],
                               load_file(str(tmp_path / "a" / "model.safetensors"))["model.embed_tokens.weight"])
            assert any("b re-ordered" in n for n in res.notes), res.notes
        else:  # output ids are b's
            assert out_ids == ids_b and torch.equal(got[:, perm], want)
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # still tied
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def added_tokens_finetune(base: Path, out: Path) -> None:
    """``base`` fine-tuned: every weight nudged, 8 added special tokens with their own trained rows."""
    from transformers import AutoTokenizer

    shutil.copytree(base, out)
    tok = AutoTokenizer.from_pretrained(base)
    assert tok.add_special_tokens({"additional_special_tokens": ADDED}) == 8
    tok.save_pretrained(out)
    sd = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    emb = sd["model.embed_tokens.weight"]
    sd["model.embed_tokens.weight"] = torch.cat([emb, torch.randn(8, emb.shape[1], generator=g)])
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = 49160
    (out / "config.json").write_text(json.dumps(cfg))


@needs_smol
def test_a_finetune_with_added_tokens_merges_with_its_base_and_keeps_their_rows(tmp_path):
    from transformers import AutoTokenizer

    tiny_smol(tmp_path / "base", seed=0)
    added_tokens_finetune(tmp_path / "base", tmp_path / "ft")
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    ft = load_file(str(tmp_path / "ft" / "model.safetensors"))
    key = "model.embed_tokens.weight"
    for method, params in (("linear", {"weight": 0.5}), ("task_arithmetic", {"weight": 0.5}), ("ties", {"weight": 0.5, "density": 0.5})):
        cfg = {"merge_method": method, "base_model": "base", "tokenizer_source": "union",
               "models": [{"model": "base", "parameters": {"weight": 0.5}}, {"model": "ft", "parameters": params}]}
        if method == "linear":
            cfg["models"][0]["parameters"] = {"weight": 0.5}
        out = tmp_path / method
        res = run_merge(cfg, out, base_dir=tmp_path, progress=False)
        merged = load_file(str(out / "model.safetensors"))
        assert merged[key].shape == (49160, 16) and "lm_head.weight" not in merged
        assert torch.equal(merged[key][49152:], ft[key][49152:]), method  # the added tokens keep their fine-tuned rows
        if method in ("linear", "task_arithmetic"):  # both are (base + ft) / 2 on the shared rows
            torch.testing.assert_close(merged[key][:49152], (base[key] + ft[key][:49152]) / 2)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 49160
        assert any("base lacks 8" in n for n in res.notes), res.notes
    # the written tokenizer round-trips with transformers: same ids as the fine-tune's, same text back
    out_tok, ft_tok = AutoTokenizer.from_pretrained(tmp_path / "linear"), AutoTokenizer.from_pretrained(tmp_path / "ft")
    text = f"{ADDED[3]} call {ADDED[7]}" + TEXT
    assert out_tok(text)["input_ids"] == ft_tok(text)["input_ids"]
    assert out_tok.convert_tokens_to_ids(ADDED) == list(range(49152, 49160)) and len(out_tok) == 49160
    assert out_tok.decode(out_tok(text)["input_ids"]) == ft_tok.decode(ft_tok(text)["input_ids"])
    assert set(ADDED) <= set(out_tok.all_special_tokens)
    for stale in ("vocab.json", "merges.txt"):  # slow files would not know the added tokens
        assert not (tmp_path / "linear" / stale).exists()
    _, ids = logits(tmp_path / "linear", text)  # the merged model loads and runs on the added tokens
    assert ADDED and max(ids) >= 49152
    # base vocabulary: the added tokens are dropped, everything else merges as before
    run_merge({"merge_method": "linear", "base_model": "base", "tokenizer_source": "base",
               "models": [{"model": "base"}, {"model": "ft"}]}, tmp_path / "b", base_dir=tmp_path, progress=False)
    assert load_file(str(tmp_path / "b" / "model.safetensors"))[key].shape == (49152, 16)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "b")) == 49152
    # union padded: 49,160 -> 49,216 rows, each new row the mean of the model's aligned rows
    run_merge({"merge_method": "linear", "base_model": "base", "tokenizer": {"source": "union", "pad_to_multiple_of": 64},
               "models": [{"model": "base"}, {"model": "ft"}]}, tmp_path / "pad", base_dir=tmp_path, progress=False)
    padded = load_file(str(tmp_path / "pad" / "model.safetensors"))[key]
    assert padded.shape == (49216, 16)
    torch.testing.assert_close(padded[-1], padded[:49160].mean(0))


def wordlevel_folder(path: Path, tokens: list[str], specials: list[str], seed: int) -> None:
    """A tiny HF folder: a WordLevel tokenizer whose first tokens are ``specials`` and a 1-layer Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = {t: i for i, t in enumerate(specials + tokens)}
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    data = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": specials[0]},
            "pre_tokenizer": {"type": "Whitespace"},
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, s in enumerate(specials)]}
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def test_untied_head_and_embeddings_are_aligned_alike_and_families_without_shared_specials_refused(tmp_path):
    words = ["the", "cat", "sat", "on", "mat"]
    wordlevel_folder(tmp_path / "a", words, ["<s>", "</s>"], seed=0)
    wordlevel_folder(tmp_path / "b", words[::-1] + ["dog"], ["<s>", "</s>"], seed=1)
    run_merge({"merge_method": "linear", "tokenizer_source": "union", "models": [{"model": "a"}, {"model": "b"}]},
              tmp_path / "ab", base_dir=tmp_path, progress=False)
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    out = load_file(str(tmp_path / "ab" / "model.safetensors"))
    # b's ids: <s> 0, </s> 1, mat 2, on 3, sat 4, cat 5, the 6, dog 7; output = a's 7 ids then dog
    b_of_out = torch.tensor([0, 1, 6, 5, 4, 3, 2, 7])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        want = torch.cat([(a[k] + b[k][b_of_out[:7]]) / 2, b[k][7:]])
        torch.testing.assert_close(out[k], want)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "ab")("the dog")["input_ids"] == [2, 7]
    wordlevel_folder(tmp_path / "c", words, ["[CLS]", "[SEP]"], seed=2)
    with pytest.raises(AttarError, match=r"share no special tokens.*\[CLS\].*union, a's ids first.*matches 5 of c's 7"):
        run_merge({"merge_method": "linear", "tokenizer_source": "union", "models": [{"model": "a"}, {"model": "c"}]},
                  tmp_path / "ac", base_dir=tmp_path, progress=False)
    with pytest.raises(AttarError, match="vocabulary size differs.*tokenizer_source: union"):
        run_merge({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}, tmp_path / "no", base_dir=tmp_path,
                  progress=False)
    with pytest.raises(AttarError, match="tokenizer source 'nowhere' is not union, base"):
        run_merge({"merge_method": "linear", "tokenizer_source": "nowhere", "models": [{"model": "a"}, {"model": "b"}]},
                  tmp_path / "nw", base_dir=tmp_path, progress=False)
    assert not any((tmp_path / n).exists() for n in ("ac", "no", "nw"))


def test_vocabulary_tensors_are_embeddings_and_heads_never_layers_inside_a_block():
    from attar.merge.vocab import is_vocab_tensor

    for name in ("model.embed_tokens.weight", "lm_head.weight", "output.weight", "transformer.wte.weight",
                 "cls.predictions.decoder.weight", "gpt_neox.embed_out.weight", "shared.weight",
                 "decoder.embed_tokens.weight"):
        assert is_vocab_tensor(name), name
    for name in ("model.layers.0.mlp.output.weight", "transformer.h.3.attn.output.weight",
                 "encoder.layer.11.output.weight", "model.layers.2.decoder.weight", "lm_head.bias", "final_output.weight"):
        assert not is_vocab_tensor(name), name


def test_a_layer_named_output_inside_a_block_does_not_cut_the_vocabulary(tmp_path):
    """Before: ``layers.0.extra.output.weight`` ([8, 8]) counted as a vocabulary tensor, and the fewest rows among those
    (8) cut the 40-token tokenizer to 8 tokens, silently. Now the merge keeps every token."""
    from transformers import AutoTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    for k, seed in (("a", 0), ("b", 1)):
        wordlevel_folder(tmp_path / k, [f"w{i}" for i in range(37)], specials, seed)
        sd = load_file(str(tmp_path / k / "model.safetensors"))
        sd["model.layers.0.extra.output.weight"] = torch.randn(8, 8)
        save_file(sd, str(tmp_path / k / "model.safetensors"), metadata={"format": "pt"})
    run_merge({"merge_method": "linear", "tokenizer_source": "union", "models": [{"model": "a"}, {"model": "b"}]},
              tmp_path / "m", base_dir=tmp_path, progress=False)
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert merged["model.embed_tokens.weight"].shape == (40, 8) and merged["model.layers.0.extra.output.weight"].shape == (8, 8)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "m")) == 40
