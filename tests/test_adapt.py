"""attar.adapt: every adapter merges exactly; LoRA initialisers, SSF folding, parameter masks, target errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attar.adapt import (
    ADAPTERS, Calibration, LoRALinear, SparseDeltaLinear, SSFLayerNorm, SSFLinear, build_adapter, count_params,
    has_adapters, merge_adapters,
)  # fmt: skip
from attar.adapt.hft import layer_group
from attar.errors import AttarError
from attar.text.data import tokenize
from attar.text.hf import load_hf_classifier
from attar.text.tiny import make_tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["i love driverless cars", "never trust google cars", "the road is safe today", "bad bad bad",
         "tesla will drive", "no way i hate it", "people like new cars", "i think it is great"]
LABELS = torch.tensor([2, 0, 1, 0, 1, 0, 2, 2])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", hidden=32, layers=2, intermediate=64)
    m = load_hf_classifier(folder, classes=["neg", "neu", "pos"], seed=0)
    return m


@pytest.fixture
def model(base):
    m = copy.deepcopy(base)
    m.tokenizer = base.tokenizer
    return m.eval()


@pytest.fixture(scope="module")
def ids(base):
    return tokenize(TEXTS, base.tokenizer, 16)


def _calib(model, ids):
    return Calibration([(ids[:4], LABELS[:4]), (ids[4:], LABELS[4:])], token_mask=model.token_mask)


def _jiggle(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


SPECS = [
    {"name": "lora", "init": "default"}, {"name": "lora", "init": "pissa"}, {"name": "lora", "init": "lora_ga", "rank": 4},
    {"name": "lora", "init": "eva", "rank": 4}, {"name": "lora", "targets": [".*attention.*"], "dropout": 0.1},
    {"name": "ssf"}, {"name": "ssf", "init_std": 0.1}, {"name": "hft"}, {"name": "lift", "rank": 4},
    {"name": "magnitude", "select": "smallest"}, {"name": "full"}, {"name": "head"},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_merged_model_equals_adapted_model(model, ids, spec):
    before = model(ids)
    a = build_adapter(spec)
    a.apply(model, _calib(model, ids), seed=0)
    if spec.get("init_std", 0) == 0:
        assert torch.allclose(model(ids), before, atol=1e-5), "an adapter must start at the base model"
    _jiggle(model)  # as if trained
    adapted = model(ids)
    merge_adapters(model)
    assert not has_adapters(model)
    assert torch.allclose(model(ids), adapted, atol=1e-5)


def test_registry_lists_every_method():
    assert set(ADAPTERS.names()) >= {"full", "head", "lora", "ssf", "hft", "lift", "magnitude"}
    with pytest.raises(AttarError, match="Known adapters: .*lora"):
        build_adapter("dora")
    with pytest.raises(AttarError, match=r"adapter 'lora': unknown field 'rnak'.*Accepted fields:.*rank \(int[^,]*, default 8\)"):
        build_adapter({"name": "lora", "rnak": 4})
    with pytest.raises(AttarError, match="field 'init'"):
        build_adapter({"name": "lora", "init": "gaussian"})


def test_target_pattern_matching_nothing_lists_modules(model):
    with pytest.raises(AttarError) as e:
        build_adapter({"name": "lora", "targets": ["q_proj"]}).apply(model)
    msg = str(e.value)
    assert "'q_proj' matches no Linear module" in msg
    assert "hf.bert.encoder.layer.0.attention.self.query" in msg and "query, value" in msg
    assert not has_adapters(model)  # checked before anything changed


def test_lora_trainable_count_and_head(model):
    build_adapter({"name": "lora", "rank": 4}).apply(model)
    trainable, total = count_params(model)
    # 2 layers x (query + value) x rank 4 x (32 + 32), plus the 3-class head (32*3 + 3)
    assert trainable == 2 * 2 * 4 * 64 + 99
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("hf.classifier") for n in names)
    assert total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_pissa_principal_part_and_residual(model):
    w0 = model.hf.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    build_adapter({"name": "lora", "init": "pissa", "rank": 4, "alpha": 8}).apply(model)
    lm = model.hf.bert.encoder.layer[0].attention.self.query
    assert isinstance(lm, LoRALinear)  # PEFT's layer
    U, S, Vh = torch.linalg.svd(w0)
    principal = (U[:, :4] * S[:4]) @ Vh[:4]
    assert torch.allclose(lm.get_delta_weight("default"), principal, atol=1e-5)
    assert torch.allclose(lm.get_base_layer().weight, w0 - principal, atol=1e-5)
    assert lm.lora_A0 is not None  # remembered for PEFT export


def test_lora_ga_first_step_follows_full_gradient(model, ids):
    """After one small SGD step the change of s·B@A is the full gradient's rank-2r truncation (LoRA-GA, Thm 3.1)."""
    for m in model.modules():  # the calibration gradient is taken in training mode; make it match this check
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    full = copy.deepcopy(model)
    full.requires_grad_(True)
    nn.functional.cross_entropy(full(ids), LABELS).backward()
    g = full.hf.bert.encoder.layer[1].attention.self.value.weight.grad
    build_adapter({"name": "lora", "init": "lora_ga", "rank": 2}).apply(model, Calibration([(ids, LABELS)]), seed=0)
    lm = model.hf.bert.encoder.layer[1].attention.self.value
    d0 = lm.get_delta_weight("default").detach().clone()
    model.train(False)
    nn.functional.cross_entropy(model(ids), LABELS).backward()
    with torch.no_grad():
        for p in (lm.lora_A["default"].weight, lm.lora_B["default"].weight):
            p -= 1e-2 * p.grad
    step = (lm.get_delta_weight("default") - d0).detach()
    U, S, Vh = torch.linalg.svd(g)
    top = (U[:, :4] * S[:4]) @ Vh[:4]  # rank 2r = 4
    cos_top = torch.nn.functional.cosine_similarity(step.flatten(), -top.flatten(), dim=0)
    assert cos_top > 0.99


def test_eva_redistributes_ranks(model, ids):
    info = build_adapter({"name": "lora", "init": "eva", "rank": 4, "eva_rho": 2}).apply(model, _calib(model, ids))
    ranks = info["eva_ranks"]
    assert sum(ranks.values()) == 4 * len(ranks) and max(ranks.values()) <= 8
    # A rows are orthonormal principal directions of the layer's (centred) inputs
    for n, r in ranks.items():
        if r:
            A = model.get_submodule(n).lora_A["default"].weight.detach()
            assert torch.allclose(A @ A.T, torch.eye(r), atol=1e-4)
    with pytest.raises(AttarError, match="already hold an adapter"):
        build_adapter({"name": "lora"}).apply(model)
    with pytest.raises(AttarError, match="needs a few training batches"):
        build_adapter({"name": "lora", "init": "eva"}).apply(merge_adapters(model))


def test_ssf_fold_is_exact(model, ids):
    build_adapter({"name": "ssf", "init_std": 0.3}).apply(model, seed=4)
    kinds = {type(m) for m in model.modules()}
    assert SSFLinear in kinds and SSFLayerNorm in kinds
    with torch.no_grad():
        adapted = model(ids).double()
    merge_adapters(model)
    assert (model(ids).double() - adapted).abs().max() < 2e-6


def test_masks_train_only_their_entries(model, ids):
    build_adapter({"name": "lift", "rank": 4, "fraction": 0.1}).apply(model)
    sd = {n: m for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)}
    w0 = {n: m.base.weight.detach().clone() for n, m in sd.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), LABELS).backward()
        opt.step()
    merge_adapters(model)
    for n, m in sd.items():
        changed = (model.get_submodule(n).weight.detach() != w0[n])
        assert changed.any() and not (changed & ~m.mask()).any(), n
        assert m.index.numel() == round(0.1 * w0[n].numel())


def test_lift_picks_largest_entries_of_low_rank_approximation(model):
    w = model.hf.bert.encoder.layer[0].output.dense.weight.detach().clone()
    build_adapter({"name": "lift", "rank": 3, "fraction": 0.05, "targets": ["layer.0.output.dense"]}).apply(model)
    m = model.hf.bert.encoder.layer[0].output.dense
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    approx = ((U[:, :3] * S[:3]) @ Vh[:3]).abs().flatten()
    k = m.index.numel()
    assert set(m.index.tolist()) == set(torch.topk(approx, k).indices.tolist())


def test_magnitude_smallest_and_largest(model):
    w = model.hf.bert.encoder.layer[1].intermediate.dense.weight.detach().abs().flatten()
    build_adapter({"name": "magnitude", "fraction": 0.1, "select": "smallest", "targets": ["layer.1.intermediate.dense"]}).apply(model)
    idx = model.hf.bert.encoder.layer[1].intermediate.dense.index
    assert w[idx].max() <= w[torch.ones_like(w, dtype=torch.bool).index_fill(0, idx, False)].min()


def test_hft_freezes_half_of_each_layer_seeded(model, base):
    info = build_adapter("hft").apply(model, seed=5)
    chosen = info["trained_matrices"]
    groups = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and not n.startswith("hf.classifier"):
            groups.setdefault(layer_group(n), []).append(any(p.requires_grad for p in m.parameters()))
    assert all(sum(v) == max(1, round(len(v) / 2)) for v in groups.values()), groups
    other = copy.deepcopy(base)
    assert build_adapter("hft").apply(other, seed=5)["trained_matrices"] == chosen
    assert build_adapter("hft").apply(copy.deepcopy(base), seed=6)["trained_matrices"] != chosen
    assert not any(p.requires_grad for n, p in model.named_parameters() if "LayerNorm" in n or "embeddings" in n)
