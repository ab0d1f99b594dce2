"""Language models on the one Trainer: chunked logits equal the whole-logit loss (value and gradient, float64),
the body/head split reproduces each architecture's logits, and a killed LM run resumes to identical weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attar.distill.lm import distill_lm, train_lm
from attar.distill.lm_objectives import LMTeacherCache, check_vocab, token_ce_loss, token_kd_loss
from attar.distill.lm_task import HeadSplit, LMLoss, LMTask
from attar.errors import AttarError
from attar.text.charlm import byte_tokenizer, lm_data, make_byte_lm

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_thread")]

TEXTS = [f"{w} is the {a} of {b}; so it goes, said {n}." for w, a, b, n in
         zip(["Time", "Love", "Code", "Rain", "Salt", "Wind", "Fire", "Snow"] * 6,
             ["friend", "enemy", "mother", "end", "root", "cost", "art", "sum"] * 6,
             ["all", "most", "none", "some", "many", "few", "each", "any"] * 6,
             [f"N{i}" for i in range(48)])]


@pytest.fixture(scope="module")
def data():
    return lm_data(TEXTS, byte_tokenizer(), prompt_len=8, max_len=40, val_fraction=0.15, test_fraction=0.15, seed=0)


def _pair(dtype=torch.float64):
    teacher = make_byte_lm(layers=1, d_model=32, heads=2, context=64, seed=0).to(dtype)
    student = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=1).to(dtype)
    return teacher, student


def _run(student, teacher, data, chunk, alpha, cache=None, on_policy=0.0, divergence="kl", args=None):
    """One batch through LMTask + LMLoss; returns the losses and the student's gradients."""
    vmap = check_vocab(teacher, student)
    task = LMTask(data.train, data.pad_id, data.eos_id, alpha=alpha, divergence_name=divergence, temperature=2.0,
                  divergence_args=args or {}, on_policy=on_policy, teacher=teacher, cache=cache, vmap=vmap,
                  chunk_tokens=chunk)
    loss = LMLoss(alpha, divergence, 2.0, args or {}, chunk)
    trainer = SimpleNamespace(device=torch.device("cpu"), steps_per_epoch=1, accumulate=1, seed=3, model=student)
    rows = torch.arange(12)
    student.zero_grad()
    batch = task.batch(trainer, rows, 0, 0)
    losses, _ = task.forward(student, loss, batch)
    losses["loss"].backward()
    return {k: v.detach().clone() for k, v in losses.items()}, [p.grad.clone() for p in student.parameters()], batch


@pytest.mark.parametrize("divergence,args", [("kl", {}), ("gjsd", {"beta": 0.3}), ("reverse_kl", {})])
def test_chunked_loss_equals_whole_logit_loss_and_hand_reference(data, divergence, args):
    teacher, student = _pair()
    whole, g_whole, batch = _run(student, teacher, data, 0, 0.4, divergence=divergence, args=args)
    chunked, g_chunked, _ = _run(student, teacher, data, 5, 0.4, divergence=divergence, args=args)
    for k in whole:
        assert torch.allclose(whole[k], chunked[k], rtol=1e-12, atol=1e-12), k
    for a, b in zip(g_whole, g_chunked):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # independently: full [B, L, V] logits of both models and the unchunked token losses
    ids, mask = batch.x, batch.mask
    attn = (ids != data.pad_id).long()
    zs = student(input_ids=ids, attention_mask=attn).logits
    with torch.no_grad():
        zt = teacher(input_ids=ids, attention_mask=attn).logits
    ref = 0.4 * token_ce_loss(zs, ids, mask) + 0.6 * token_kd_loss(zs, zt, mask, divergence, 2.0, **args)
    assert torch.allclose(whole["loss"], ref, rtol=1e-10, atol=1e-12)


def test_chunked_loss_with_a_cache_and_on_policy_rows_equals_whole(data):
    teacher, student = _pair()
    cache = LMTeacherCache.build(teacher, data.train.ids, k=7, temperature=2.0, pad_id=data.pad_id)
    runs = [_run(student, teacher, data, chunk, 0.25, cache=cache, on_policy=0.5) for chunk in (0, 3)]
    (whole, g_whole, batch), (chunked, g_chunked, _) = runs
    assert bool(batch.on_policy.any()) and bool(batch.from_cache.any()) and bool((~batch.from_cache).any())
    assert torch.allclose(whole["loss"], chunked["loss"], rtol=1e-12, atol=1e-12)
    for a, b in zip(g_whole, g_chunked):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              max_position_embeddings=64, final_logit_softcapping=5.0))


@pytest.mark.parametrize("make", [lambda: make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0), _tiny_llama,
                                  _tiny_gemma3], ids=["gpt2", "llama", "gemma3-softcap"])
def test_body_and_head_reproduce_the_models_logits(make):
    model = make().eval()
    split = HeadSplit(model)
    assert split.verify()
    ids = torch.randint(0, 90, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(split.logits(split.hidden(ids, None)), model(input_ids=ids).logits.float(), atol=1e-5)


class _Kill(Exception):
    pass


def test_killed_lm_distillation_resumes_to_identical_weights_and_records(data, tmp_path):
    settings = dict(steps=12, batch_size=8, lr=5e-3, eval_every=3, checkpoint_every=4, warmup_steps=2, alpha=0.3,
                    restore_best=True, progress=False)
    teacher, full = _pair(torch.float32)
    ref = distill_lm(full, data, teacher, **settings)

    _, killed = _pair(torch.float32)

    def kill(step, rec):
        if step == 9:
            raise _Kill  # after the step-8 checkpoint: steps 9.. are lost, like a SIGKILL

    with pytest.raises(_Kill):
        distill_lm(killed, data, teacher, ckpt_dir=tmp_path, on_metrics=kill, **settings)
    _, fresh = _pair(torch.float32)  # a new process: weights from the checkpoint only
    res = distill_lm(fresh, data, teacher, ckpt_dir=tmp_path, resume=True, **settings)
    for (k, a), b in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), k
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ref.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
    assert res.metrics["steps"] == 12 and res.metrics["best_step"] == ref.metrics["best_step"]


def test_lm_training_stops_on_a_step_budget_with_accumulation(data):
    model = make_byte_lm(layers=1, d_model=16, heads=2, context=64, seed=0)
    res = train_lm(model, data, steps=5, batch_size=4, accumulate=2, eval_every=5, progress=False)
    assert res.metrics["steps"] == 5 and [h["step"] for h in res.history] == [5]


def test_a_run_that_does_not_fit_is_refused_with_the_estimate_and_the_fix(data, monkeypatch):
    from attar.distill import lm_memory

    teacher, student = _pair(torch.float32)
    parts = lm_memory.estimate_lm_memory(student, teacher, batch_size=8, length=40, chunk_tokens=None)
    n_params = sum(p.numel() for m in (teacher, student) for p in m.parameters())
    assert parts["weights"] == 4 * n_params and parts["optimizer"] == 12 * sum(p.numel() for p in student.parameters())
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    whole = lm_memory.estimate_lm_memory(student, teacher, batch_size=8, length=40, chunk_tokens=0)
    assert whole["logits"] >= parts["logits"]
    monkeypatch.setattr(lm_memory, "available_bytes", lambda device: 1024)
    before = [p.clone() for p in student.parameters()]
    with pytest.raises(AttarError, match=r"needs about .* GiB .* are free .*gradient_checkpointing.*lora"):
        distill_lm(student, data, teacher, steps=2, batch_size=8, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # refused before any step


def test_agreement_from_precomputed_teacher_logits_equals_the_live_teacher():
    """A teacher's test logits computed once (bench: a 1.5B teacher against many students) give the same numbers."""
    from attar.stages.lm import agreement, scored_logits
    from attar.text.charlm import LMSplit

    teacher, student = _tiny_llama().eval(), _tiny_llama().eval()
    torch.manual_seed(3)
    for p in student.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(1, 90, (5, 12), generator=torch.Generator().manual_seed(2))
    ids[3, 9:] = 0  # a padded row
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 4:] = True
    mask[3, 9:] = False
    split = LMSplit(ids, mask, torch.full((5,), 4))
    live = agreement(teacher, student, split, 0, None, batch_size=2)
    stored = agreement(scored_logits(teacher, split, 0, batch_size=2), student, split, 0, None, batch_size=2)
    assert live == pytest.approx(stored, rel=1e-6) and 0 < live["kl_to_teacher"] and 0 < live["top1_agreement"] <= 1
    # by hand: position t is scored when token t+1 is a response token
    with torch.no_grad():
        attn = (ids != 0).long()
        zt, zs = teacher(ids, attention_mask=attn).logits[:, :-1], student(ids, attention_mask=attn).logits[:, :-1]
    at = mask[:, 1:]
    lt, ls = zt[at].log_softmax(-1), zs[at].log_softmax(-1)
    assert live["kl_to_teacher"] == pytest.approx(float((lt.exp() * (lt - ls)).sum(-1).mean()), rel=1e-4)
    assert live["top1_agreement"] == pytest.approx(float((lt.argmax(-1) == ls.argmax(-1)).float().mean()))


def test_free_memory_is_read_after_freed_heap_memory_is_handed_back(monkeypatch):
    """A second model trained in one process must not be refused for memory the first one freed: glibc keeps freed
    memory in its heap, where MemAvailable does not count it, so the check trims the heap before reading."""
    import ctypes

    from attar.distill import lm_memory

    calls = []

    class Libc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    free = lm_memory.available_bytes(torch.device("cpu"))
    assert calls == [0] and free is not None and free > 0
