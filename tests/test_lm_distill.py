"""Causal-LM distillation (token KD, top-k cache, vocabulary check, on-policy, sequence-level KD) and
sequence-classification KD into a small student, on tiny models."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from attar.distill.divergences import DIVERGENCES
from attar.distill.lm import distill_lm, perplexity, sample_continuations, sequence_kd, teacher_generations, train_lm
from attar.distill.lm_objectives import LMTeacherCache, TopK, check_vocab, token_ce_loss, token_kd_loss
from attar.distill.textcls import BagOfEmbeddings, distill_classifier, tiny_transformer_student
from attar.errors import AttarError
from attar.text.charlm import (BYTE_VOCAB, EOS_ID, PAD_ID, byte_tokenizer, lm_data, lm_pairs, load_causal_lm,
                               make_byte_lm)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

TEXTS = [f"{w} is the {a} of {b}; so it goes, said {n}." for w, a, b, n in
         zip(["Time", "Love", "Code", "Rain", "Salt", "Wind", "Fire", "Snow"] * 8,
             ["friend", "enemy", "mother", "end", "root", "cost", "art", "sum"] * 8,
             ["all", "most", "none", "some", "many", "few", "each", "any"] * 8,
             [f"N{i}" for i in range(64)])]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return lm_data(TEXTS, tok, prompt_len=8, max_len=48, val_fraction=0.15, test_fraction=0.15, seed=0)


def _kl(p_logits, q_logits):
    p, lq = torch.softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((p * (torch.log(p) - lq)).sum())


# ---------------------------------------------------------------------------------------------- data / tokenizer


def test_byte_tokenizer_round_trip_and_folder(tmp_path, tok):
    s = "Grüße, world!\n  %"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert ids == list(s.encode("utf-8"))
    assert tok.decode(ids) == s and len(tok) == BYTE_VOCAB
    assert (tok.eos_token_id, tok.pad_token_id) == (EOS_ID, PAD_ID)
    m = make_byte_lm(tmp_path / "lm", layers=1, d_model=16, heads=2, context=64)
    m2, tok2 = load_causal_lm(tmp_path / "lm")
    x = torch.tensor([ids[:10]])
    m.eval()
    assert torch.allclose(m(x).logits, m2(x).logits, atol=1e-6)
    assert tok2.get_vocab() == tok.get_vocab()


def test_lm_data_masks_prompt_and_padding(data, tok):
    tr = data.train
    for i in range(len(tr)):
        p = int(tr.prompt_len[i])
        assert not tr.mask[i, :p].any()  # BOS + prompt never scored
        assert tr.mask[i, p]
        assert not tr.mask[i][tr.ids[i] == PAD_ID].any()
    assert int(tr.prompt_len[0]) == 9  # BOS + 8 bytes
    pairs = lm_pairs(["Q: 2+2?"], [" 4"], tok, max_len=32)
    assert tok.decode(pairs.ids[0][pairs.mask[0]]) == " 4<|endoftext|>"
    assert not set(data.test.texts) & set(data.train.texts)


# ---------------------------------------------------------------------------------------------- the loss


def test_masked_token_kd_equals_hand_computed_value():
    torch.manual_seed(0)
    s, t = torch.randn(1, 5, 6), torch.randn(1, 5, 6)
    mask = torch.tensor([[False, False, True, True, False]])  # tokens 2, 3 are the response
    loss = token_kd_loss(s, t, mask, "kl", temperature=1.0)
    # logits at positions 1 and 2 predict tokens 2 and 3
    hand = (_kl(t[0, 1], s[0, 1]) + _kl(t[0, 2], s[0, 2])) / 2
    assert float(loss) == pytest.approx(hand, rel=1e-5)
    # prompt positions and the last position do not matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 0], t2[0, 3], s2[0, 4] = 9.0, -3.0, 5.0
    assert float(token_kd_loss(s2, t2, mask, "kl")) == pytest.approx(hand, rel=1e-5)
    # temperature: KL of the softened rows, times T^2
    hand_t = (_kl(t[0, 1] / 2, s[0, 1] / 2) + _kl(t[0, 2] / 2, s[0, 2] / 2)) / 2 * 4
    assert float(token_kd_loss(s, t, mask, "kl", temperature=2.0)) == pytest.approx(hand_t, rel=1e-5)
    # CE on the same positions
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    ce = -(torch.log_softmax(s[0, 1], -1)[2] + torch.log_softmax(s[0, 2], -1)[3]) / 2
    assert float(token_ce_loss(s, ids, mask)) == pytest.approx(float(ce), rel=1e-5)
    # nothing scored: exactly 0, still on the graph
    z = token_kd_loss(s.requires_grad_(), t, torch.zeros_like(mask))
    assert float(z.detach()) == 0.0
    z.backward()


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_every_divergence_works_per_token(name):
    torch.manual_seed(1)
    s = torch.randn(2, 4, 7, requires_grad=True)
    t = torch.randn(2, 4, 7)
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    loss = token_kd_loss(s, t, mask, name, temperature=2.0)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert float(s.grad[:, -1].abs().sum()) == 0.0  # the last position predicts nothing
    tol = 0.05 if name.startswith("sinkhorn") else 1e-5  # Sinkhorn's entropic bias (see divergences.py)
    assert float(token_kd_loss(t.clone(), t, mask, name, temperature=2.0)) == pytest.approx(0.0, abs=tol)
    topk = TopK.from_logits(t, k=3, temperature=2.0)
    assert math.isfinite(float(token_kd_loss(s, topk, mask, name, temperature=2.0).detach()))


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "gjsd", "js", "tvd", "skew_kl", "skew_reverse_kl"])
def test_topk_cache_equals_full_logits_when_k_is_vocab(name):
    torch.manual_seed(2)
    s, t = torch.randn(3, 6, 11), torch.randn(3, 6, 11) * 2
    mask = torch.rand(3, 6) > 0.3
    full = token_kd_loss(s, t, mask, name, temperature=1.5)
    cached = token_kd_loss(s, TopK.from_logits(t, k=11, temperature=1.5), mask, name, temperature=1.5)
    assert float(cached) == pytest.approx(float(full), rel=1e-4, abs=1e-6)


def test_topk_tail_bucket_is_a_lower_bound_and_hand_checked():
    torch.manual_seed(3)
    s, t = torch.randn(1, 3, 9), torch.randn(1, 3, 9)
    mask = torch.tensor([[False, True, True]])
    tk = TopK.from_logits(t, k=2)
    # hand: buckets (top-2 tokens, everything else) for positions 0 and 1
    vals = []
    for pos in (0, 1):
        p, q = torch.softmax(t[0, pos], -1), torch.softmax(s[0, pos], -1)
        top = p.topk(2).indices
        rest = torch.ones(9, dtype=torch.bool)
        rest[top] = False
        pb = torch.cat([p[top], p[rest].sum().view(1)])
        qb = torch.cat([q[top], q[rest].sum().view(1)])
        vals.append(float((pb * (pb.log() - qb.log())).sum()))
    got = float(token_kd_loss(s, tk, mask, "kl"))
    assert got == pytest.approx(sum(vals) / 2, rel=1e-5)
    assert got <= float(token_kd_loss(s, t, mask, "kl")) + 1e-6
    with pytest.raises(AttarError, match="temperature"):
        token_kd_loss(s, tk, mask, "kl", temperature=2.0)


def test_lm_teacher_cache_matches_live_teacher(data, tmp_path):
    teacher = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=3)
    cache = LMTeacherCache.build(teacher, data.train.ids, k=BYTE_VOCAB, pad_id=data.pad_id)
    rows = torch.arange(4)
    ids, mask = data.train.ids[rows], data.train.mask[rows]
    s = torch.randn(*ids.shape, BYTE_VOCAB)
    with torch.no_grad():
        live = teacher(input_ids=ids, attention_mask=(ids != data.pad_id).long()).logits
    a = float(token_kd_loss(s, live, mask, "kl"))
    b = float(token_kd_loss(s, cache.get(rows), mask, "kl"))
    assert b == pytest.approx(a, rel=2e-3)  # float16 storage
    cache.save(tmp_path / "c.safetensors")
    c2, built = LMTeacherCache.load_or_build(tmp_path / "c.safetensors", teacher, data.train.ids, k=BYTE_VOCAB)
    assert not built and torch.equal(c2.values, cache.values)
    small = LMTeacherCache.build(teacher, data.train.ids, k=8, pad_id=data.pad_id)
    assert small.bytes < cache.bytes / 10


# ---------------------------------------------------------------------------------------------- vocabulary check


def test_vocab_mismatch_is_refused_before_training(data, tok):
    teacher = make_byte_lm(layers=1, d_model=16, heads=2, context=64)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, vocab_size=300)
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(AttarError, match=r"(?s)258.*300|300.*258") as e:
        distill_lm(student, data, teacher, steps=2, batch_size=4)
    assert "token_map" in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    # same size, different token -> id maps: named sizes, refused
    other = {k: (v + 1) % BYTE_VOCAB for k, v in tok.get_vocab().items()}
    with pytest.raises(AttarError, match="258 tokens"):
        check_vocab(teacher, teacher, tok, other)
    # a mapping makes it legal: student ids 0..257 map to the same teacher ids, the rest unmapped
    tmap = torch.cat([torch.arange(BYTE_VOCAB), torch.full((300 - BYTE_VOCAB,), -1)])
    res = distill_lm(student, data, teacher, steps=2, batch_size=4, token_map=tmap, eval_every=2)
    assert math.isfinite(res.history[-1]["loss"])
    with pytest.raises(AttarError, match="one-to-one"):
        check_vocab(teacher, student, token_map={0: 5, 1: 5})


# ---------------------------------------------------------------------------------------------- training


def test_few_steps_reduce_the_loss(data):
    teacher = make_byte_lm(layers=1, d_model=32, heads=2, context=64, seed=0)
    r = train_lm(teacher, data, steps=40, batch_size=16, lr=1e-2, eval_every=10, warmup_steps=0)
    assert r.history[-1]["ce"] < r.history[0]["ce"] and r.history[-1]["val_ppl"] < r.history[0]["val_ppl"]
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=1)
    r2 = distill_lm(student, data, teacher, steps=30, batch_size=16, lr=1e-2, eval_every=10, warmup_steps=0)
    assert r2.history[-1]["kd"] < r2.history[0]["kd"]
    assert perplexity(teacher, data.test, data.pad_id) < 258


def test_on_policy_lambda_zero_equals_off_policy(data):
    teacher = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0)
    runs = []
    for extra in ({}, {"on_policy": 0.0, "monitor_prompts": 8}, {"on_policy": 0.5}):
        st = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=1)
        res = distill_lm(st, data, teacher, steps=4, batch_size=8, eval_every=2, restore_best=False, **extra)
        runs.append((st, res))
    (a, ra), (b, rb), (c, rc) = runs
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ra.metrics["on_policy_rows"] == rb.metrics["on_policy_rows"] == 0
    assert rc.metrics["on_policy_rows"] == 4 * 4
    assert "teacher_nll_of_samples" in rc.history[-1]
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_on_policy_guard_and_sampling(data):
    teacher = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=1)
    with pytest.raises(AttarError, match="min_ground_truth"):
        distill_lm(student, data, teacher, on_policy=0.9)
    with pytest.raises(AttarError, match="live teacher"):
        distill_lm(student, data, None, cache=LMTeacherCache.build(teacher, data.train.ids, 4), on_policy=0.5)
    part = data.train.rows(torch.arange(6))
    g = torch.Generator().manual_seed(0)
    out = sample_continuations(student, part, data.pad_id, data.eos_id, generator=g)
    for i in range(6):
        p = int(part.prompt_len[i])
        assert torch.equal(out.ids[i, :p], part.ids[i, :p])
        assert not out.mask[i, :p].any() and out.mask[i, p]
    gens = teacher_generations(teacher, part, data.pad_id, data.eos_id, seed=0)
    assert torch.equal(gens.ids, teacher_generations(teacher, part, data.pad_id, data.eos_id, seed=0).ids)
    r = sequence_kd(student, teacher, data, steps=3, batch_size=8, eval_every=3)
    assert "sequence-level" in r.metrics["teacher"]


# ---------------------------------------------------------------------------------------------- classification KD


def test_sequence_classification_kd_on_tiny_bert(tmp_path):
    from attar.text.data import load_text
    from attar.text.hf import load_hf_classifier
    from attar.text.tiny import make_tiny_bert

    make_tiny_bert(tmp_path / "bert", hidden=32, layers=1, intermediate=64)
    words = {"pos": ["love", "great", "good"], "neg": ["hate", "terrible", "bad"]}
    rows = [(f"i {words[c][i % 3]} self driving cars", c) for i in range(40) for c in ("pos", "neg")]
    pd.DataFrame({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}).to_csv(tmp_path / "t.csv", index=False)
    teacher = load_hf_classifier(tmp_path / "bert", classes=["neg", "pos"])
    bundle = load_text({"csv": str(tmp_path / "t.csv"), "max_length": 16}, teacher.tokenizer)
    train = {"epochs": 2, "batch_size": 8}
    bag = BagOfEmbeddings.for_teacher(teacher, dim=16)
    out = distill_classifier(teacher, bag, bundle, train=train, transfer=bundle.val.ids,
                             cache_path=tmp_path / "cache.safetensors")
    assert 0.0 <= out["test_accuracy"] <= 1.0 and out["labeled_rows"] < out["train_rows"]
    assert "cached" in out["teacher_mode"]
    ce = distill_classifier(teacher, BagOfEmbeddings.for_teacher(teacher, dim=16), bundle, objective={"name": "ce"},
                            train=train)
    assert 0.0 <= ce["test_accuracy"] <= 1.0
    tiny = tiny_transformer_student(teacher, layers=1, hidden=16, heads=2, intermediate=32)
    out2 = distill_classifier(teacher, tiny, bundle, train=train, objective={"name": "kd", "divergence": "tvd"})
    assert 0.0 <= out2["test_accuracy"] <= 1.0
    wrong = BagOfEmbeddings(50, 2, 8, pad_id=teacher.pad_id)
    with pytest.raises(AttarError, match="mismatch"):
        distill_classifier(teacher, wrong, bundle, train=train)


def test_teacher_hacking_guard_flags_stops_and_restores(data, monkeypatch):
    """Validation perplexity rising while the teacher likes the student's samples more: flagged, stopped, restored."""
    import attar.distill.lm as lm

    teacher = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=1)
    ppl = iter([10.0, 11.0, 12.0, 13.0, 14.0, 15.0])
    nll = iter([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    states = []
    monkeypatch.setattr(lm, "perplexity", lambda m, *a, **k: (states.append({k2: v.clone() for k2, v in m.state_dict().items()}), next(ppl))[1])
    monkeypatch.setattr(lm, "token_ce_loss", lambda *a, **k: torch.tensor(next(nll)))
    cache = LMTeacherCache.build(teacher, data.train.ids, 8, pad_id=data.pad_id)
    res = distill_lm(student, data, teacher, cache=cache, steps=12, batch_size=4, eval_every=2, on_policy=0.5,
                     monitor_prompts=4, patience=3, stop_on_hacking=True)
    assert res.metrics["teacher_hacking_suspected"] and res.metrics["stopped_at"] == 8
    assert res.metrics["restored_step"] == 2 and res.metrics["on_policy_rows"] == 8 * 2
    assert all(torch.equal(v, states[0][k]) for k, v in student.state_dict().items())
