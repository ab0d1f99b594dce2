"""attar against mergekit 0.1.5 on mergekit's own config shapes: which configs attar accepts, and whether it merges
them as mergekit does. Writes the pass rate into docs/merge.md (``--write``).

The configs are mergekit's 65 (``mergekit_sources()`` maps each to its file or test): the 6 YAMLs of its
``examples/`` and the 59 configs its tests build (``tests/test_basic_merges.py`` 49, ``test_chat_template.py`` 2,
``test_tokenizer.py`` 8; GitHub main at a6e4028, the newest public source, since the 0.1.5 wheel ships no
tests), plus extra variants of the same methods, counted apart. The models are tiny stand-ins: the 3-layer Llama
models of tests/golden/merge/models (base, ft_a, ft_b, ft_c; float32; GPT-2 in the tests becomes ft_a, layer
ranges are scaled to 3 layers) with a 16-token tokenizer, one model with 2 added tokens (18 rows, the tests'
model_chatml) and one whose tokenizer has 4 tokens beyond its 16 rows (model_padded); the Granite and LLaVA
models are built here at the tests' sizes with fixed seeds. Token ids and names of test_tokenizer.py scale
with the vocabulary (64 -> 16: token id 64 -> 16, _tok_20/_tok_21 -> _tok_12/_tok_13). Every config is
run in float32 (mergekit's tests use bfloat16, where mergekit computes in bfloat16 and attar in float32;
docs/merge.md explains the difference). mergekit runs in its own venv (never an attar dependency):

    python3 -m venv bench/.venvs/mergekit
    bench/.venvs/mergekit/bin/pip install /path/to/torch-2.13.0+cpu-...whl   # the CPU wheel first
    bench/.venvs/mergekit/bin/pip install mergekit==0.1.5
    .venv/bin/python bench/mergekit_configs.py [--mergekit-python bench/.venvs/mergekit/bin/python] [--write]

A config passes when both tools accept it and the merged tensors agree (deterministic methods: every tensor
within 1e-6 relative; random ones, DARE and DELLA: in distribution, the fraction of entries changed from the
base within 0.03 and the mean |change| within 10%), or when both refuse it; it fails when only one accepts it
or the tensors differ. attar's refusals are listed with their reason. The LLaVA stand-ins are saved under the
names transformers 5 loads them as (``model.language_model.*``); ``save_pretrained`` writes the legacy names
(``language_model.model.*``), under which mergekit 0.1.5 leaves the whole language model out (one extra variant,
``vlm_linear_legacy_names``, shows it: those tensors are compared by the names transformers 5 maps them to, and
the row fails naming what mergekit's output lacks).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "merge" / "models"
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}


def two(method: str, a: str = "ft_a", b: str = "ft_b", base: str | None = "base", params: dict | None = None,
        wa: float = 0.6, wb: float = 0.4, **extra) -> dict:
    """mergekit's tests' ``two_model_config``: two models weighted 0.6 / 0.4, an optional base, shared parameters."""
    cfg = {"merge_method": method, "models": [{"model": a, "parameters": {"weight": wa}}, {"model": b, "parameters": {"weight": wb}}],
           "dtype": "float32"}
    if base:
        cfg["base_model"] = base
    if params:
        cfg["parameters"] = params
    cfg.update(extra)
    return cfg


def configs() -> dict[str, dict]:
    c: dict[str, dict] = {}
    # mergekit's examples/ (model names replaced by the stand-ins; layer ranges scaled to 3 layers)
    c["ex_linear"] = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "ft_a", "parameters": {"weight": 1.0}}, {"model": "ft_b", "parameters": {"weight": 0.3}},
        {"model": "ft_c", "parameters": {"weight": 0.5}}]}
    c["ex_ties"] = {"merge_method": "ties", "base_model": "base", "dtype": "float32",
                    "parameters": {"normalize": True, "int8_mask": True}, "models": [
        {"model": "ft_a", "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": "ft_b", "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
        {"model": "ft_c", "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}]}
    c["ex_bio_merge"] = {"merge_method": "ties", "base_model": "base", "dtype": "float32",
                         "parameters": {"normalize": False, "int8_mask": True}, "models": [
        {"model": "ft_a", "parameters": {"density": 0.5, "weight": 0.5}},
        {"model": "ft_b", "parameters": {"density": 0.5, "weight": 0.5}}]}
    c["ex_gradient_slerp"] = {"merge_method": "slerp", "base_model": "ft_a", "dtype": "float32",
                              "slices": [{"sources": [{"model": "ft_a", "layer_range": [0, 3]}, {"model": "ft_b", "layer_range": [0, 3]}]}],
                              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                   {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}
    c["ex_frankenmerge"] = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": "ft_a", "layer_range": [0, 2]}]}, {"sources": [{"model": "ft_b", "layer_range": [1, 3]}]}]}
    c["ex_arcee_fusion"] = {"merge_method": "arcee_fusion", "base_model": "ft_a", "dtype": "float32",
                            "models": [{"model": "ft_a"}, {"model": "ft_b"}]}
    # tests/test_basic_merges.py
    c["copy"] = {"merge_method": "passthrough", "models": [{"model": "ft_a"}], "dtype": "float32"}
    c["stack"] = {"merge_method": "passthrough", "dtype": "float32",
                  "slices": [{"sources": [{"model": "ft_a", "layer_range": [0, 3]}]}] * 2}
    c["passthrough_scale"] = {"merge_method": "passthrough", "models": [
        {"model": "ft_a", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}
    c["linear"] = two("linear", base=None)
    c["linear_3"] = {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in (("ft_a", 0.6), ("ft_b", 0.4), ("ft_c", 0.2))]}
    c["slerp_weighted"] = two("slerp", a="ft_a", b="ft_b", base="ft_a", params={"t": 0.35})
    c["slerp_models_weighted"] = two("slerp", a="base", b="ft_b", base="base", params={"t": 0.5})
    # TestGraniteMerges: on two tiny Granite models
    c["granite_copy"] = {"merge_method": "passthrough", "models": [{"model": "granite_a"}], "dtype": "float32"}
    c["granite_linear"] = two("linear", a="granite_a", b="granite_b", base=None)
    c["granite_slerp"] = {"merge_method": "slerp", "base_model": "granite_a", "dtype": "float32", "parameters": {"t": 0.5},
                          "models": [{"model": "granite_a"}, {"model": "granite_b"}]}
    for base in (None, "ft_c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                c[f"nuslerp_{'base' if base else 'nobase'}_row{int(row_wise)}_flat{int(flatten)}"] = two(
                    "nuslerp", base=base, params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})
    c["nuslerp_zero_weights"] = two("nuslerp", base="ft_c", wa=-0.5, wb=0.5, params={"nuslerp_row_wise": False, "nuslerp_flatten": False})
    c["nuslerp_default"] = two("nuslerp", base=None)
    c["task_arithmetic"] = two("task_arithmetic", base="ft_c")
    c["task_arithmetic_lambda"] = two("task_arithmetic", params={"lambda": 0.7, "normalize": True})
    c["breadcrumbs"] = two("breadcrumbs", base="ft_c")
    c["breadcrumbs_ties"] = two("breadcrumbs_ties", params={"density": 0.6, "gamma": 0.05})
    c["ties"] = two("ties", base="ft_c", params={"density": 0.3})
    c["ties_3"] = {"merge_method": "ties", "base_model": "base", "dtype": "float32", "parameters": {"density": 0.5}, "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in (("ft_a", 1.0), ("ft_b", 0.6), ("ft_c", 0.8))]}
    c["sce"] = two("sce", base="ft_c", params={"select_topk": 0.5})
    c["sce_3"] = {"merge_method": "sce", "base_model": "base", "dtype": "float32", "parameters": {"select_topk": 0.3},
                  "models": [{"model": "ft_a"}, {"model": "ft_b"}, {"model": "ft_c"}]}
    c["sce_all"] = two("sce")
    c["ram"] = two("ram", base="ft_c")
    c["ramplus_tl"] = two("ramplus_tl", base="ft_c", params={"r": 0.05, "alpha": 1.0})
    c["multislerp"] = two("multislerp", base="ft_c")
    c["multislerp_nobase_3"] = {"merge_method": "multislerp", "dtype": "float32", "models": [
        {"model": m, "parameters": {"weight": w}} for m, w in (("ft_a", 0.5), ("ft_b", 0.3), ("ft_c", 0.2))]}
    c["multislerp_unnormalized"] = two("multislerp", base="base", params={"normalize_weights": False})
    c["dare_ties"] = two("dare_ties", base="ft_c", params={"density": 0.66})
    c["dare_linear"] = two("dare_linear", params={"density": 0.5})
    c["model_stock"] = two("model_stock", a="ft_b", b="ft_c", base="ft_a")
    c["model_stock_filterwise"] = two("model_stock", a="ft_b", b="ft_c", base="ft_a", params={"filter_wise": True})
    c["model_stock_3"] = {"merge_method": "model_stock", "base_model": "base", "dtype": "float32",
                          "models": [{"model": "ft_a"}, {"model": "ft_b"}, {"model": "ft_c"}]}
    c["model_stock_identical"] = {"merge_method": "model_stock", "base_model": "base", "dtype": "float32",
                                  "models": [{"model": "ft_a"}, {"model": "ft_a_copy"}]}
    c["arcee_fusion"] = two("arcee_fusion", base="ft_a")
    c["nearswap"] = two("nearswap", a="ft_a", b="ft_b", base="ft_a", params={"t": 0.0001})
    c["nearswap_wide"] = two("nearswap", a="base", b="ft_b", base="base", params={"t": 0.02})
    c["della"] = two("della", base="ft_c", params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})
    c["della_invalid_epsilon"] = two("della", base="ft_c", params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    c["della_linear"] = two("della_linear", base="base", params={"density": 0.5, "epsilon": 0.1})
    c["karcher"] = two("karcher", base="ft_c", params={"max_iter": 5, "tol": 1e-5})
    c["karcher_nobase"] = two("karcher", base=None)
    c["karcher_one"] = {"merge_method": "karcher", "dtype": "float32", "models": [{"model": "ft_a"}]}
    # the VLM tests: the same shapes on three tiny LLaVA models (CLIP vision tower + Llama language model)
    c["vlm_linear"] = two("linear", a="vlm_a", b="vlm_b", base=None)
    c["vlm_slerp"] = two("slerp", a="vlm_a", b="vlm_b", base="vlm_a", params={"t": 0.35})
    for base in (None, "vlm_c"):
        for row_wise in (False, True):
            for flatten in (False, True):
                c[f"vlm_nuslerp_{'base' if base else 'nobase'}_row{int(row_wise)}_flat{int(flatten)}"] = two(
                    "nuslerp", a="vlm_a", b="vlm_b", base=base, params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})
    c["vlm_nuslerp_zero_weights"] = two("nuslerp", a="vlm_a", b="vlm_b", base="vlm_c", wa=-0.5, wb=0.5,
                                        params={"nuslerp_row_wise": False, "nuslerp_flatten": False})
    c["vlm_task_arithmetic"] = two("task_arithmetic", a="vlm_a", b="vlm_b", base="vlm_c")
    c["vlm_breadcrumbs"] = two("breadcrumbs", a="vlm_a", b="vlm_b", base="vlm_c")
    c["vlm_ties"] = two("ties", a="vlm_a", b="vlm_b", base="vlm_c", params={"density": 0.3})
    c["vlm_dare_ties"] = two("dare_ties", a="vlm_a", b="vlm_b", base="vlm_c", params={"density": 0.66})
    c["vlm_model_stock"] = two("model_stock", a="vlm_b", b="vlm_c", base="vlm_a")
    c["vlm_model_stock_filterwise"] = two("model_stock", a="vlm_b", b="vlm_c", base="vlm_a", params={"filter_wise": True})
    # extra: LLaVA as save_pretrained writes it (legacy names); mergekit 0.1.5 leaves out the language model
    c["vlm_linear_legacy_names"] = two("linear", a="vlm_a_legacy", b="vlm_b_legacy", base=None)
    # tests/test_chat_template.py (models with a tokenizer)
    for name, template in (("chat_chatml", "chatml"), ("chat_literal", "{{messages[0]['content']}}")):
        c[name] = {"merge_method": "linear", "base_model": "tok_base", "dtype": "float32", "chat_template": template,
                   "models": [{"model": "tok_base", "parameters": {"weight": 0.5}}, {"model": "tok_b", "parameters": {"weight": 0.5}}]}
    # tests/test_tokenizer.py: every model weighted 1.0; tok_padded's tokenizer has 4 tokens beyond its embedding
    # rows, tok_wide 2 added chat tokens with rows (the tests' model_padded and model_chatml, at vocabulary 16, not 64)
    def tok(models: list[str], **extra) -> dict:
        return {"merge_method": "linear", "base_model": "tok_base", "dtype": "float32", "parameters": {},
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]} | extra

    three = ["tok_base", "tok_padded", "tok_wide"]
    c["tok_legacy_mode"] = tok(three)
    c["tok_source_base"] = tok(three, tokenizer_source="base")
    c["tok_source_union"] = tok(three, tokenizer_source="union")
    c["tok_source_model"] = tok(three, tokenizer_source="tok_wide")
    c["tok_slerp_union"] = tok(["tok_base", "tok_wide"], merge_method="slerp", tokenizer_source="union", parameters={"t": 0.5})
    c["tok_force_token"] = tok(["tok_base", "tok_wide"], tokenizer={"source": "union", "tokens": {
        "_tok_10": {"source": "tok_wide", "force": True}, "_tok_11": {"source": "tok_base", "force": True}}})
    c["tok_model_token_id"] = tok(["tok_base", "tok_wide"], tokenizer={"source": "base", "tokens": {  # _tok_20/21 at vocabulary 64
        "_tok_12": {"source": {"kind": "model_token", "model": "tok_wide", "token_id": 16}, "force": True},
        "_tok_13": {"source": {"kind": "model_token", "model": "tok_base", "token": "<s>"}, "force": True}}})
    c["tok_pad_to_multiple_of"] = tok(["tok_wide"], base_model="tok_wide", tokenizer={"source": "base", "pad_to_multiple_of": 16})
    # extra variants of the tokenizer settings: two models weighted 0.5 (not configs of mergekit's tests)
    c["tok_pad"] = {"merge_method": "linear", "base_model": "tok_base", "dtype": "float32",
                    "tokenizer": {"source": "base", "pad_to_multiple_of": 24},
                    "models": [{"model": "tok_base", "parameters": {"weight": 0.5}}, {"model": "tok_b", "parameters": {"weight": 0.5}}]}
    c["tok_pad_ties"] = {"merge_method": "ties", "base_model": "tok_base", "dtype": "float32", "parameters": {"density": 0.5},
                         "tokenizer": {"source": "union", "pad_to_multiple_of": 7},
                         "models": [{"model": "tok_b", "parameters": {"weight": 0.5}}, {"model": "tok_c", "parameters": {"weight": 0.5}}]}
    c["tok_source_base_same"] = {"merge_method": "linear", "base_model": "tok_base", "dtype": "float32", "tokenizer_source": "base",
                                 "models": [{"model": "tok_base", "parameters": {"weight": 0.5}}, {"model": "tok_b", "parameters": {"weight": 0.5}}]}
    # extra variants of tokenizer.tokens and of a tokenizer listing tokens past its rows
    c["tok_force_ties"] = tok(["tok_base", "tok_wide", "tok_b"], merge_method="ties", parameters={"density": 0.5}, tokenizer={
        "source": "union", "tokens": {"_tok_7": {"source": "tok_wide", "force": True}, "<|im_end|>": {"source": {"kind": "zero"}, "force": True}}})
    c["tok_fill_sources"] = tok(["tok_base", "tok_wide"], tokenizer={"source": "union", "tokens": {
        "<|im_start|>": {"source": {"kind": "zero"}}, "<|im_end|>": {"source": {"kind": "model_token", "model": "tok_base", "token": "</s>"}},
        "_tok_4": {"source": "tok_wide"}}})
    c["tok_base_padded"] = tok(["tok_padded", "tok_base"], base_model="tok_padded", tokenizer_source="base")
    for src in ("union", "base", "tok_wide"):
        c[f"tok_merge_{src}"] = {"merge_method": "linear", "base_model": "tok_base", "dtype": "float32", "tokenizer_source": src,
                                 "models": [{"model": "tok_base", "parameters": {"weight": 0.5}}, {"model": "tok_wide", "parameters": {"weight": 0.5}}]}
    return c


def mergekit_sources() -> dict[str, str]:
    """The 65 configs of mergekit (its 6 examples/ YAMLs and the 59 configs its tests build) -> where each is from.

    The tests are those of mergekit's GitHub main at a6e4028 (2026-06-17; the newest public source; the 0.1.5
    wheel ships no tests): test_basic_merges.py builds 49 (3 Granite, 29 Llama/GPT-2, 17 LLaVA),
    test_chat_template.py 2, test_tokenizer.py 8. Every other config here is an extra variant (other model counts
    or parameters of the same methods), counted apart.
    """
    ex = {"ex_linear": "linear.yml", "ex_ties": "ties.yml", "ex_bio_merge": "bio-merge.yml",
          "ex_gradient_slerp": "gradient-slerp.yml", "ex_frankenmerge": "orcamini-platy-44layer.yml",
          "ex_arcee_fusion": "arcee_fusion.yml"}
    src = {k: f"examples/{v}" for k, v in ex.items()}
    basic = {"granite_copy": "test_granite_copy", "granite_linear": "test_granite_linear_merge",
             "granite_slerp": "test_granite_slerp", "copy": "test_gpt2_copy", "stack": "test_gpt2_stack",
             "passthrough_scale": "test_passthrough_scale", "linear": "test_linear_merge", "slerp_weighted": "test_slerp_merge",
             "nuslerp_zero_weights": "test_nuslerp_merges", "task_arithmetic": "test_task_arithmetic_merge",
             "breadcrumbs": "test_breadcrumbs_merge", "ties": "test_ties_merge", "sce": "test_sce_merge", "ram": "test_ram_merge",
             "ramplus_tl": "test_ramplus_tl_merge", "multislerp": "test_multislerp_merge", "dare_ties": "test_dare_ties_merge",
             "model_stock": "test_model_stock_merge", "model_stock_filterwise": "test_model_stock_filterwise_merge",
             "arcee_fusion": "test_arcee_fusion_merge", "nearswap": "test_nearswap_merge", "della": "test_della_merge",
             "della_invalid_epsilon": "test_della_invalid_epsilon", "karcher": "test_karcher_merge",
             "vlm_linear": "test_linear_VLM_merge", "vlm_slerp": "test_slerp_VLM_merge",
             "vlm_nuslerp_zero_weights": "test_nuslerp_VLM_merges", "vlm_task_arithmetic": "test_task_arithmetic_VLM_merge",
             "vlm_breadcrumbs": "test_breadcrumbs_VLM_merge", "vlm_ties": "test_ties_VLM_merge",
             "vlm_dare_ties": "test_dare_ties_VLM_merge", "vlm_model_stock": "test_model_stock_VLM_merge",
             "vlm_model_stock_filterwise": "test_model_stock_filterwise_VLM_merge"}
    for prefix, test in (("nuslerp", "test_nuslerp_merges"), ("vlm_nuslerp", "test_nuslerp_VLM_merges")):
        for base in ("nobase", "base"):
            for row in (0, 1):
                for flat in (0, 1):
                    basic[f"{prefix}_{base}_row{row}_flat{flat}"] = test
    src |= {k: f"tests/test_basic_merges.py::{v}" for k, v in basic.items()}
    src |= {"chat_chatml": "tests/test_chat_template.py::test_template_chatml",
            "chat_literal": "tests/test_chat_template.py::test_template_literal_jinja"}
    tok = {"tok_legacy_mode": "test_legacy_mode", "tok_source_base": "test_source_base", "tok_source_union": "test_source_union",
           "tok_source_model": "test_source_model", "tok_slerp_union": "test_slerp_union", "tok_force_token": "test_force_token",
           "tok_model_token_id": "test_model_token_id", "tok_pad_to_multiple_of": "test_pad_to_multiple_of"}
    src |= {k: f"tests/test_tokenizer.py::{v}" for k, v in tok.items()}
    assert len(src) == 65, len(src)
    return src


def make_models(work: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    for name in ("base", "ft_a", "ft_b", "ft_c"):
        shutil.copytree(GOLDEN / name, work / name)
    shutil.copytree(GOLDEN / "ft_a", work / "ft_a_copy")

    def tokenizer(added: list[str]) -> PreTrainedTokenizerFast:
        tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, 16)]
        data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(16))), "merges": []}, "added_tokens": []}
        with tempfile.TemporaryDirectory() as d:
            Tokenizer.from_str(json.dumps(data)).save(f"{d}/tokenizer.json")
            tok = PreTrainedTokenizerFast(tokenizer_file=f"{d}/tokenizer.json", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        tok.add_tokens(added)
        return tok

    for name, src in (("tok_base", "base"), ("tok_b", "ft_b"), ("tok_c", "ft_c")):
        shutil.copytree(GOLDEN / src, work / name)
        tokenizer([]).save_pretrained(work / name)
    wide = work / "tok_wide"
    shutil.copytree(GOLDEN / "ft_a", wide)
    sd = load_file(str(wide / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.randn(2, sd[k].shape[1], generator=g)])
    save_file(sd, str(wide / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((wide / "config.json").read_text())
    cfg["vocab_size"] = 18
    (wide / "config.json").write_text(json.dumps(cfg))
    tokenizer(["<|im_start|>", "<|im_end|>"]).save_pretrained(wide)
    padded = work / "tok_padded"  # 16 rows, 20 tokens: test_tokenizer.py's model_padded
    shutil.copytree(GOLDEN / "ft_c", padded)
    tokenizer([f"<UNUSED_{i}>" for i in range(4)]).save_pretrained(padded)
    make_other_architectures(work)


def make_other_architectures(work: Path) -> None:
    """The tests' tiny Granite and LLaVA models (their sizes), randomly initialised with fixed seeds, float32."""
    import torch
    from transformers import (CLIPVisionConfig, GraniteConfig, GraniteForCausalLM, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    for i, name in enumerate(("granite_a", "granite_b")):
        torch.manual_seed(100 + i)
        GraniteForCausalLM(GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                         num_key_value_heads=2, num_hidden_layers=2)).save_pretrained(work / name)
    from safetensors.torch import save_file

    for i, name in enumerate(("vlm_a", "vlm_b", "vlm_c")):
        torch.manual_seed(200 + i)
        vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64,
                                  intermediate_size=128)
        text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16))
        # save_pretrained writes LLaVA's legacy names (language_model.model.*), which mergekit 0.1.5 cannot map to
        # the transformers 5 names it plans with (transformers' own llava renaming gives
        # model.language_model.model.*), so it marks the whole language model optional and leaves it out. The
        # stand-ins are saved under the names transformers 5 loads them as (model.language_model.*, lm_head,
        # model.vision_tower.*, model.multi_modal_projector.*), which both tools read; *_legacy keep save_pretrained's.
        model.save_pretrained(work / f"{name}_legacy")
        out = work / name
        out.mkdir()
        model.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})


MERGEKIT_SCRIPT = r"""
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
work, names = sys.argv[1], sys.argv[2:]
status = {}
for name in names:
    try:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(open(f"{work}/configs/{name}.yaml")))
        run_merge(cfg, f"{work}/mergekit/{name}", options=MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, random_seed=0))
        status[name] = "ok"
    except Exception as e:
        status[name] = f"{type(e).__name__}: {str(e)[:300]}"
json.dump(status, open(f"{work}/mergekit_status.json", "w"), indent=1)
"""


def load_dir(path: Path):
    import torch  # noqa: F401
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(name: str, cfg: dict, ours: Path, theirs: Path, work: Path) -> tuple[bool, str]:
    import torch

    a, b = load_dir(ours), load_dir(theirs)
    renamed = missing = ""
    if set(a) != set(b) and set(b) <= {_llava_name(k) for k in a}:
        a = {_llava_name(k): v for k, v in a.items()}
        renamed = "names compared as transformers 5 maps LLaVA's (attar keeps the input's, mergekit writes the new ones); "
    if set(b) < set(a):  # mergekit left tensors out: say which, and compare the ones it wrote
        gone = sorted(set(a) - set(b))
        missing = f"mergekit's output lacks {len(gone)} of {len(a)} tensors ({', '.join(gone[:2])}, ...); "
        a = {k: v for k, v in a.items() if k in b}
    if set(a) != set(b):
        return False, f"tensor names differ: only attar {sorted(set(a) - set(b))[:3]}, only mergekit {sorted(set(b) - set(a))[:3]}"
    for k in a:
        if a[k].shape != b[k].shape:
            return False, f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
    for f in ("config.json",):
        ca, cb = json.loads((ours / f).read_text()), json.loads((theirs / f).read_text())
        for key in ("num_hidden_layers", "vocab_size"):
            if ca.get(key) != cb.get(key):
                return False, f"config.json {key}: {ca.get(key)} vs {cb.get(key)}"
    if cfg.get("chat_template"):
        ta = json.loads((ours / "tokenizer_config.json").read_text()).get("chat_template") or ""
        tb_file = theirs / "chat_template.jinja"
        tb = tb_file.read_text() if tb_file.is_file() else json.loads((theirs / "tokenizer_config.json").read_text()).get("chat_template", "")
        needle = "<|im_start|>" if cfg["chat_template"] == "chatml" else cfg["chat_template"]
        if needle not in ta or needle not in tb:
            return False, "chat template missing"
    if cfg.get("tokenizer_source") or cfg.get("tokenizer"):  # the output vocabularies: token -> id, added tokens included
        from attar.merge.vocab import tokenizer_vocab

        va, vb = tokenizer_vocab(ours), tokenizer_vocab(theirs)
        if va is None or va != vb:
            return False, f"tokenizer vocabularies differ: {len(va or {})} vs {len(vb or {})} tokens"
    if cfg["merge_method"] in RANDOM:
        base = load_dir(work / cfg["base_model"])
        if renamed:
            base = {_llava_name(k): v for k, v in base.items()}
        fa = sum(int(((a[k] - base[k]).abs() > 1e-7).sum()) for k in a) / sum(v.numel() for v in a.values())
        fb = sum(int(((b[k] - base[k]).abs() > 1e-7).sum()) for k in b) / sum(v.numel() for v in b.values())
        ma = sum(float((a[k] - base[k]).abs().sum()) for k in a)
        mb = sum(float((b[k] - base[k]).abs().sum()) for k in b)
        ok = abs(fa - fb) < 0.03 and abs(ma - mb) <= 0.1 * max(ma, mb)
        if missing:
            return False, missing + renamed + f"the {len(a)} it wrote, in distribution ({'agree' if ok else 'differ'})"
        return ok, f"in distribution: changed fraction {fa:.3f} vs {fb:.3f}, sum |change| {ma:.4f} vs {mb:.4f}"
    worst = 0.0
    exact = True
    for k in a:
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        scale = float(b[k].double().abs().max()) if b[k].numel() else 0.0
        worst = max(worst, d / max(scale, 1e-12))
        exact = exact and torch.equal(a[k], b[k])
    same = "bit-identical" if exact else f"max relative difference {worst:.1e}"
    if missing:
        return False, missing + renamed + f"the {len(a)} it wrote: {same} ({'agree' if worst <= 1e-6 else 'differ'})"
    return worst <= 1e-6, renamed + same


# transformers 5 loads LLaVA checkpoints saved with the old names (``language_model.model.*``, ``vision_tower.*``,
# ``multi_modal_projector.*``) under new ones; mergekit 0.1.5 writes the new names, attar the input's own.
_LLAVA_RENAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                  ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def _llava_name(name: str) -> str:
    for old, new in _LLAVA_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mergekit-python", default=str(ROOT / "bench" / ".venvs" / "mergekit" / "bin" / "python"))
    ap.add_argument("--write", action="store_true", help="write the result table into docs/merge.md")
    ap.add_argument("--only", nargs="*", help="run only these configs")
    args = ap.parse_args()

    import yaml

    sys.path.insert(0, str(ROOT / "src"))
    from attar.errors import AttarError
    from attar.merge import run_merge

    cfgs = configs()
    if args.only:
        cfgs = {k: v for k, v in cfgs.items() if k in args.only}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_models(work)
        (work / "configs").mkdir()
        for name, cfg in cfgs.items():
            (work / "configs" / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        subprocess.run([str(Path.cwd() / args.mergekit_python), "-c", MERGEKIT_SCRIPT, str(work), *cfgs], cwd=work, check=True,
                       stdout=subprocess.DEVNULL)
        mk_status = json.loads((work / "mergekit_status.json").read_text())
        for name, cfg in cfgs.items():
            try:
                res = run_merge(work / "configs" / f"{name}.yaml", work / "attar" / name, progress=False, base_dir=work)
                at = "ok"
                notes = res.notes
            except AttarError as e:
                at, notes = f"refused: {str(e).splitlines()[0][:200]}", []
            mk = mk_status.get(name, "not run")
            if at == "ok" and mk == "ok":
                ok, detail = compare(name, cfg, work / "attar" / name, work / "mergekit" / name, work)
            elif at != "ok" and mk != "ok":
                ok, detail = True, f"both refuse (attar {at}; mergekit {mk[:120]})"
            elif at == "ok":
                ok, detail = False, f"mergekit fails: {mk[:200]}"
            else:
                ok, detail = False, f"attar {at}"
            rows.append((name, cfg["merge_method"], at == "ok", mk == "ok", ok, detail, notes))
            print(f"{'PASS' if ok else 'FAIL'} {name:32s} {cfg['merge_method']:16s} {detail}", flush=True)
    sources = mergekit_sources()

    def tally(rs: list) -> str:
        passed = sum(r[4] for r in rs)
        equal = sum(r[4] and r[2] for r in rs)
        short = sum(r[5].startswith("mergekit's output lacks") and r[5].endswith("(agree)") for r in rs)
        return (f"{passed} of {len(rs)} pass ({equal} accepted by both and equal, {passed - equal} refused by both); "
                f"attar accepts {sum(r[2] for r in rs)}, mergekit {sum(r[3] for r in rs)}"
                + (f"; {short} fail only because mergekit's output lacks tensors (the ones it writes agree)" if short else ""))

    ours = [r for r in rows if r[0] in sources]
    extra = [r for r in rows if r[0] not in sources]
    summary = f"mergekit's own configs: {tally(ours)}." + (f" Extra variants: {tally(extra)}." if extra else "")
    print(summary)
    if args.write:
        import torch

        lines = ["<!-- mergekit-configs:start (bench/mergekit_configs.py --write) -->", "",
                 f"{summary} torch {torch.__version__}, mergekit 0.1.5 in its own venv, float32.", "",
                 "| config | from mergekit's | method | attar | mergekit | result |", "|---|---|---|---|---|---|"]
        for name, method, a_ok, m_ok, ok, detail, _ in ours + extra:
            where = f"`{sources[name]}`" if name in sources else "(extra variant)"
            lines.append(f"| `{name}` | {where} | `{method}` | {'accepts' if a_ok else 'refuses'} | {'accepts' if m_ok else 'refuses'} | "
                         f"{'pass' if ok else '**fail**'}: {detail.replace('|', '/')} |")
        lines += ["", "<!-- mergekit-configs:end -->"]
        doc = ROOT / "docs" / "merge.md"
        text = doc.read_text()
        start, end = "<!-- mergekit-configs:start", "<!-- mergekit-configs:end -->"
        block = "\n".join(lines)
        if start in text:
            text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        doc.write_text(text)
    # the exit status: mergekit's own configs all pass (extra variants may record known mergekit defects)
    return 0 if all(r[4] for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
