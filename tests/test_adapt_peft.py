"""LoRA adapters in the PEFT format: exported adapters load with peft.PeftModel.from_pretrained, and import back."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from attar.adapt import Calibration, build_adapter, export_peft, import_peft, lora_modules, merge_adapters
from attar.errors import AttarError
from attar.text.data import tokenize
from attar.text.hf import load_hf_classifier, save_hf_classifier
from attar.text.tiny import make_tiny_bert

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"), pytest.mark.usefixtures("one_thread")]

TEXTS = ["i love driverless cars", "never trust google cars", "the road is safe today", "bad bad bad"]
LABELS = torch.tensor([2, 0, 1, 0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    enc = make_tiny_bert(root / "encoder")
    # The base a PEFT user would load: the encoder with its (untrained) 3-class head, saved as an HF folder.
    base = load_hf_classifier(enc, classes=["neg", "neu", "pos"], seed=0)
    save_hf_classifier(base, root / "base")
    return root, root / "base"


def _trained(base_dir, spec, ids):
    m = load_hf_classifier(base_dir)
    build_adapter(spec).apply(m, Calibration([(ids, LABELS)], token_mask=m.token_mask), seed=0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def _peft_load(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(base_dir))
    return PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


@pytest.mark.parametrize("spec", [
    {"name": "lora", "rank": 4, "alpha": 8},
    {"name": "lora", "rank": 2, "init": "pissa", "targets": ["query", "key", "value", "attention.output.dense"]},
    {"name": "lora", "rank": 2, "init": "lora_ga"},
    {"name": "lora", "rank": 3, "init": "eva", "targets": [".*dense"]},
], ids=["default", "pissa", "lora_ga", "eva"])
def test_export_loads_in_peft_with_equal_outputs(setup, spec, tmp_path):
    root, base_dir = setup
    tok = load_hf_classifier(base_dir).tokenizer
    ids = tokenize(TEXTS, tok, 12)
    m = _trained(base_dir, spec, ids)
    want = m(ids)
    export_peft(m, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["classifier"]
    pm = _peft_load(base_dir, tmp_path / "adapter")
    got = pm(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits
    assert torch.allclose(got, want, atol=1e-5)
    if spec.get("init") in ("pissa", "lora_ga"):  # base offset: exported as rank 2r against the untouched base
        assert set(cfg["rank_pattern"].values()) | {cfg["r"]} == {2 * spec["rank"]}
    # ... and back into attar, onto a fresh base
    back = import_peft(load_hf_classifier(base_dir), tmp_path / "adapter").eval()
    assert len(lora_modules(back)) == len(lora_modules(m))
    assert torch.allclose(back(ids), want, atol=1e-5)
    merge_adapters(back)
    assert torch.allclose(back(ids), want, atol=1e-5)


def test_peft_written_adapter_imports(setup, tmp_path):
    root, base_dir = setup
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(base_dir))
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS",
                                       rank_pattern={"layer.1.attention.self.value": 2}, alpha_pattern={"query": 4}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(str(tmp_path / "ad"))
    m = import_peft(load_hf_classifier(base_dir), tmp_path / "ad").eval()
    ids = tokenize(TEXTS, m.tokenizer, 12)
    pm.eval()
    want = pm(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert torch.allclose(m(ids), want, atol=1e-5)
    assert m.hf.bert.encoder.layer[1].attention.self.value.r["default"] == 2


def test_export_refuses_what_peft_cannot_hold(setup, tmp_path):
    _, base_dir = setup
    m = load_hf_classifier(base_dir)
    with pytest.raises(AttarError, match="no LoRA layers"):
        export_peft(m, tmp_path / "a")
    build_adapter("ssf").apply(m)
    with pytest.raises(AttarError, match="no LoRA layers"):
        export_peft(m, tmp_path / "a")
    m = load_hf_classifier(base_dir)
    build_adapter({"name": "lora", "rank": 2}).apply(m)
    m.hf.bert.embeddings.LayerNorm.weight.requires_grad_(True)
    with pytest.raises(AttarError, match="outside the LoRA layers"):
        export_peft(m, tmp_path / "a")
    with pytest.raises(AttarError, match="no adapter_config.json"):
        import_peft(load_hf_classifier(base_dir), tmp_path)


def test_exported_adapter_feeds_attar_merge(setup, tmp_path):
    """BASE+ADAPTER in attar merge gives the same weights as attar's own merge."""
    root, base_dir = setup
    m = _trained(base_dir, {"name": "lora", "rank": 2, "init": "pissa"}, tokenize(TEXTS, load_hf_classifier(base_dir).tokenizer, 12))
    export_peft(m, tmp_path / "adapter")
    merged = merge_adapters(copy.deepcopy(m))
    from attar.merge.sources import open_source

    src = open_source(f"{base_dir}+{tmp_path / 'adapter'}")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    got = src.get(name)
    want = merged.hf.state_dict()[name]
    assert torch.allclose(got.float(), want, atol=1e-5)


def test_lora_layers_are_peft_layers_and_merge_as_peft_does(setup, tmp_path):
    from peft.tuners.lora import LoraLayer

    _, base_dir = setup
    m = _trained(base_dir, {"name": "lora", "rank": 2, "init": "pissa"}, tokenize(TEXTS, load_hf_classifier(base_dir).tokenizer, 12))
    layers = lora_modules(m)
    assert len(layers) == 4 and all(isinstance(layer, LoraLayer) for layer in layers.values())
    assert not hasattr(m.hf, "peft_config")  # a plain Hugging Face model that carries PEFT layers
    with pytest.raises(AttarError, match="merge_adapters"):
        save_hf_classifier(m, tmp_path / "unmerged")
    want = {n: layer.get_base_layer().weight + layer.get_delta_weight("default") for n, layer in layers.items()}
    merge_adapters(m)
    for n, w in want.items():
        assert type(m.get_submodule(n)) is torch.nn.Linear and torch.allclose(m.get_submodule(n).weight, w)
    save_hf_classifier(m, tmp_path / "merged")


def test_import_refuses_adapters_that_do_not_fit(setup, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, base_dir = setup
    m = _trained(base_dir, {"name": "lora", "rank": 2}, tokenize(TEXTS, load_hf_classifier(base_dir).tokenizer, 12))
    export_peft(m, tmp_path / "ok")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ok", folder)
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        change(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder

    cases = [
        (lambda t: t.__setitem__(key.replace("query", "qkv"), t.pop(key)), "targets modules the model does not have.*qkv"),
        (lambda t: t.__setitem__(key, torch.zeros(2, 7)), "LoRA shapes do not fit the model"),
        (lambda t: t.pop(key.replace("lora_A", "lora_B")), "do not match PEFT's LoRA layers.*query.lora_B"),
    ]
    for i, (change, words) in enumerate(cases):
        with pytest.raises(AttarError, match=words):
            import_peft(load_hf_classifier(base_dir), variant(f"v{i}", change))
