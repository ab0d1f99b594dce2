"""Cross-tokenizer KD (issue 12): ULD and the GOLD-style hybrid against hand-computed values and identities, the
alignment of positions by text spans, the vocabulary check naming the mode, and a tiny LM stage whose teacher reads
text with Qwen2.5's tokenizer while the student uses SmolLM2's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from attar.distill.divergences import divergence
from attar.distill.lm import distill_lm
from attar.distill.lm_cross_tokenizer import (CrossTokenizer, SharedVocab, align_ends, gold_loss, token_ends,
                                              uld_loss)
from attar.distill.lm_objectives import check_vocab
from attar.errors import AttarError
from attar.text.charlm import byte_tokenizer, lm_data, make_byte_lm

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

MODELS = Path(__file__).resolve().parents[1] / "runs" / "models"
SMOL, QWEN = MODELS / "smollm2-135m", MODELS / "qwen2.5-coder-0.5b"
needs_models = pytest.mark.skipif(not (SMOL / "tokenizer.json").exists() or not (QWEN / "tokenizer.json").exists(),
                                  reason="runs/models tokenizers not present")
TEXTS = [f"The {a} of {b} is {c}; naïve café-{i} said: “{a} {c}!”  Ok." for i, (a, b, c) in enumerate(
    zip(["river", "stone", "light", "song", "wind", "salt"] * 6, ["time", "love", "code", "rain"] * 9,
        ["blue", "old", "near", "free", "slow", "ripe"] * 6))]


@pytest.fixture(scope="module")
def toks():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOL), AutoTokenizer.from_pretrained(QWEN)


# ---------------------------------------------------------------------------------------------- losses
def test_uld_is_the_l1_distance_of_the_sorted_probabilities_by_hand():
    teacher = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))  # sorted: .5 .3 .2
    student = torch.log(torch.tensor([[0.4, 0.6]]))  # sorted and padded: .6 .4 0
    assert float(uld_loss(student, teacher)) == pytest.approx(0.1 + 0.1 + 0.2, abs=1e-6)
    # at T = 2 the distributions flatten first: p ∝ sqrt(p)
    p = torch.tensor([0.2, 0.5, 0.3]).sqrt()
    p = (p / p.sum()).sort(descending=True).values
    q = torch.tensor([0.4, 0.6]).sqrt()
    q = torch.cat([(q / q.sum()).sort(descending=True).values, torch.zeros(1)])
    assert float(uld_loss(student, teacher, temperature=2.0)) == pytest.approx(float((p - q).abs().sum()), abs=1e-6)


def test_uld_is_zero_for_a_permuted_vocabulary_with_the_same_distribution():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 50, generator=g)
    perm = torch.randperm(50, generator=g)
    assert float(uld_loss(z, z[:, perm], reduction="sum")) == pytest.approx(0.0, abs=1e-6)
    # extra teacher tokens with no mass change nothing; a different distribution is not zero
    padded = torch.cat([z[:, perm], torch.full((5, 7), -1e4)], 1)
    assert float(uld_loss(z, padded, reduction="sum")) == pytest.approx(0.0, abs=1e-6)
    assert float(uld_loss(z, torch.randn(5, 50, generator=g))) > 0.05


@pytest.mark.parametrize("name,T", [("kl", 1.0), ("kl", 2.0), ("reverse_kl", 1.0), ("js", 1.0), ("tvd", 1.0)])
def test_gold_equals_ordinary_kd_when_the_tokenizers_are_the_same(name, T):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    want = divergence(name, s, t, T, "none")
    assert torch.allclose(gold_loss(s, t, SharedVocab.identity(40), name, T, "none"), want, atol=1e-5)
    # the same with the teacher's vocabulary in another order and the shared pairs saying so
    perm = torch.randperm(40, generator=g)  # teacher id k holds student token perm[k]
    shared = SharedVocab(perm, torch.arange(40), 40, 40)
    assert torch.allclose(gold_loss(s, t[:, perm], shared, name, T, "none"), want, atol=1e-5)


def test_gold_with_one_unshared_token_a_side_is_kl_plus_their_l1_gap():
    """Shared {0, 1}, one token apart on each side: the chain rule's rest term is a single bucket (its KL is 0),
    so gold = KL(p ‖ q) + |p₂ − q₂| exactly."""
    p = torch.tensor([[0.5, 0.2, 0.3]])
    q = torch.tensor([[0.3, 0.3, 0.4]])
    shared = SharedVocab(torch.tensor([0, 1]), torch.tensor([0, 1]), 3, 3)
    kl = float((p * (p / q).log()).sum())
    got = float(gold_loss(q.log(), p.log(), shared))
    assert got == pytest.approx(kl + abs(0.3 - 0.4), abs=1e-6)
    # nothing shared: gold is ULD
    none = SharedVocab(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 3, 3)
    assert float(gold_loss(q.log(), p.log(), none)) == pytest.approx(float(uld_loss(q.log(), p.log())), abs=1e-7)


def test_gradients_flow_to_the_student_through_both_losses():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 30, generator=g)
    shared = SharedVocab(torch.arange(10), torch.arange(5, 15), 20, 30)
    for loss in (lambda s: uld_loss(s, t), lambda s: gold_loss(s, t, shared)):
        s = torch.randn(4, 20, generator=g, requires_grad=True)
        loss(s).backward()
        assert torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) > 0
        assert torch.allclose(s.grad.sum(-1), torch.zeros(4), atol=1e-5)  # softmax: logits' shift does nothing


# ---------------------------------------------------------------------------------------------- positions
def test_positions_pair_where_token_ends_coincide():
    # student "The|re| is" ends 3, 5, 8; teacher "There| i|s" ends 5, 7, 8
    assert align_ends([3, 5, 8], [5, 7, 8]) == [(1, 0), (2, 2)]
    # a character split over two byte tokens (same end twice) pairs once, at its last token
    assert align_ends([2, 4, 4, 5], [4, 5]) == [(2, 0), (3, 1)]
    assert align_ends([1, 2], [3]) == []


@needs_models
def test_real_tokenizers_pair_positions_that_have_read_the_same_text(toks):
    stok, ttok = toks
    cross = CrossTokenizer("uld", stok, ttok, len(stok), len(ttok))
    text = "Hello  world!\n\n  It's   a café — naïve 日本語 test\t\tend"
    ids = [stok.bos_token_id] + stok(text, add_special_tokens=False)["input_ids"] + [stok.eos_token_id]
    ra = cross.align_row(ids)
    assert ra.teacher_ids[0] == ttok.convert_tokens_to_ids("<|im_start|>")  # same special by string
    assert ra.teacher_ids[-1] == ttok.convert_tokens_to_ids("<|im_end|>")
    for i, j in ra.pairs:  # both prefixes are the same text
        assert stok.decode(ids[: i + 1]) == ttok.decode(ra.teacher_ids[: j + 1])
    assert len(ra.pairs) >= 0.7 * len(ids)
    ends = token_ends(stok, ids[1:-1], text)
    assert ends[-1] == len(text) and ends == sorted(ends)


# ---------------------------------------------------------------------------------------------- the check
@needs_models
def test_the_vocabulary_check_names_the_mode_and_the_shared_tokens(toks):
    stok, ttok = toks
    v = check_vocab(len(ttok), len(stok), ttok, stok, cross_tokenizer="auto")
    assert v.cross == "gold" and (v.student_size, v.teacher_size) == (len(stok), len(ttok))
    n = int(SharedVocab.of(stok, ttok, len(stok), len(ttok)).student.numel())
    assert n > 30_000 and f"{n:,} token strings shared" in v.note
    assert check_vocab(len(ttok), len(stok), ttok, stok, cross_tokenizer="uld").cross == "uld"
    for asked in ("off", None):  # ordinary token KD asked for (or a caller with no cross route): refused, option named
        with pytest.raises(AttarError, match=rf"(?s)mismatch.*{n:,} token strings are shared.*cross_tokenizer: gold"):
            check_vocab(len(ttok), len(stok), ttok, stok, cross_tokenizer=asked)
    # one tokenizer: ordinary KD under auto, the cross loss only when asked
    assert check_vocab(len(stok), len(stok), stok, stok, cross_tokenizer="auto").cross is None
    assert check_vocab(len(stok), len(stok), stok, stok, cross_tokenizer="gold").cross == "gold"
    with pytest.raises(AttarError, match="needs both tokenizers"):
        check_vocab(300, 258, None, None, cross_tokenizer="uld")


# ---------------------------------------------------------------------------------------------- training
def test_gold_across_one_tokenizer_trains_exactly_like_ordinary_kd():
    """Same tokenizer, cross_tokenizer: gold: every position pairs and GOLD is KL, so the run equals ordinary KD.
    (ASCII text: a byte tokenizer splits é into two tokens, and the position between them pairs with nothing.)"""
    tok = byte_tokenizer()
    ascii_texts = [t.encode("ascii", "ignore").decode() for t in TEXTS]
    data = lm_data(ascii_texts, tok, prompt_len=6, max_len=40, seed=0)
    teacher = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=3)
    runs = {}
    for mode in ("off", "gold"):
        student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=4)
        res = distill_lm(student, data, teacher, steps=3, batch_size=8, alpha=0.3, eval_every=3, warmup_steps=0,
                         cross_tokenizer=mode, student_tokenizer=tok, teacher_tokenizer=tok, progress=False)
        runs[mode] = res
    assert runs["gold"].metrics["paired_fraction"] == 1.0
    split = lm_data(TEXTS, tok, prompt_len=6, max_len=40, seed=0).train  # é = 2 bytes: its first byte pairs with nothing
    assert CrossTokenizer("gold", tok, tok, len(tok), len(tok)).pairing_rate(split) < 1.0
    for a, b in zip(runs["off"].history, runs["gold"].history):
        if "loss" in a:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    for p, q in zip(runs["off"].model.parameters(), runs["gold"].model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def _tiny_from(src: Path, dst: Path, seed: int) -> Path:
    """A tiny random model with ``src``'s architecture and vocabulary, saved with ``src``'s tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads((src / "config.json").read_text())
    d.pop("layer_types", None)
    d |= {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 128}
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("teacher_tok", ["byte", "qwen"])
def test_an_lm_stage_distils_a_teacher_with_another_tokenizer_into_a_smollm2_tokenizer_student(tmp_path, teacher_tok):
    """SmolLM2's BPE student from a Qwen-tokenizer teacher (where Qwen is converted) or from a byte-level teacher
    (attar's own tokenizer: always there, so CI runs this path)."""
    import yaml

    from attar.pipeline import Pipeline
    from attar.recipe import load_recipe

    if not (SMOL / "tokenizer.json").exists() or (teacher_tok == "qwen" and not (QWEN / "tokenizer.json").exists()):
        pytest.skip("runs/models tokenizers not present")
    student = _tiny_from(SMOL, tmp_path / "smol", 0)
    if teacher_tok == "qwen":
        teacher = _tiny_from(QWEN, tmp_path / "qwen", 1)
    else:
        teacher = tmp_path / "byte"
        make_byte_lm(teacher, layers=1, d_model=32, heads=2, context=256, seed=1)  # bytes: ~4x the BPE tokens
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    lm = {"student": {"hf": str(student)}, "teacher": {"hf": str(teacher)},
          "data": {"name": str(corpus), "max_len": 20, "prompt_len": 4, "val_limit": 4, "test_limit": 4},
          "train": {"steps": 8, "batch_size": 2, "lr": 0.02, "alpha": 0.5, "warmup_steps": 0, "eval_every": 4}}
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump({"name": "xtok", "stages": [{"name": "s", "kind": "lm", "lm": lm}]}))
    logs: list[str] = []
    run = Pipeline(*load_recipe(r), home=tmp_path / "home", log=lambda *a, **k: logs.append(" ".join(map(str, a)))).run()
    saved = json.loads((run / "s" / "lm-metrics.json").read_text())
    m, hist = saved["metrics"], [h for h in saved["history"] if "kd" in h]
    assert "cross-tokenizer gold" in m["cross_tokenizer"] and 0.5 < m["paired_fraction"] <= 1
    assert any("the tokenizers differ: cross-tokenizer KD (gold)" in line for line in logs)
    assert math.isfinite(m["test_ppl"]) and "teacher_test_ppl" not in m
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["kd"] < hist[0]["kd"]
    # ordinary token KD asked for explicitly: refused, the cross-tokenizer option named
    lm["train"]["cross_tokenizer"] = "off"
    r.write_text(yaml.safe_dump({"name": "xtok", "stages": [{"name": "s", "kind": "lm", "lm": lm}]}))
    with pytest.raises(AttarError, match="cross_tokenizer: gold"):
        Pipeline(*load_recipe(r), home=tmp_path / "home2", log=lambda *a, **k: None).run()
