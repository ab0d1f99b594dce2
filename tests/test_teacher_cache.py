"""Teacher cache: exact reconstruction, top-k mass bookkeeping, ensembles, memory, save/load."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attar.distill.teacher_cache import TeacherCache
from attar.errors import AttarError

FP16 = dict(rtol=2e-3, atol=1e-4)


def teacher(seed: int, c: int = 10, d: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, c))
    with torch.no_grad():
        m[2].weight.mul_(3)  # peaky enough that top-k matters
    return m


@pytest.fixture
def x():
    return torch.randn(37, 8, generator=torch.Generator().manual_seed(0))


def test_full_and_k_equals_c_reconstruct_softmax(x):
    t = teacher(0)
    z = t(x).detach()
    for k in (None, 10):
        cache = TeacherCache.build([t], x, k=k, batch_size=8)
        out = cache.logits(torch.arange(len(x)))
        assert out.shape == (37, 10) and out.dtype == torch.float32
        assert torch.allclose(torch.softmax(out, -1), torch.softmax(z, -1), **FP16)
    # a single teacher's full cache is exact at every temperature (τ·log_softmax is a row shift)
    full = TeacherCache.build([t], x, k=None)
    assert torch.allclose(torch.softmax(full.logits(torch.arange(37)) / 4, -1), torch.softmax(z / 4, -1), **FP16)


def test_topk_keeps_probabilities_and_spreads_leftover_uniformly(x):
    t = teacher(1)
    p = torch.softmax(t(x).detach(), -1)
    k = 3
    cache = TeacherCache.build([t], x, k=k)
    assert cache.index.dtype == torch.int16 and cache.values.dtype == torch.float16
    idx = torch.tensor([5, 0, 36, 5])
    q = torch.softmax(cache.logits(idx), -1)
    top_p, top_i = p[idx].topk(k, -1)
    assert torch.allclose(q.gather(1, top_i), top_p, **FP16)
    mask = torch.ones_like(q, dtype=torch.bool).scatter_(1, top_i, False)
    rest = q[mask].view(len(idx), -1)  # the 7 other classes
    assert torch.allclose(rest, rest[:, :1].expand_as(rest), rtol=1e-5)  # uniform
    assert torch.allclose(rest.sum(-1), 1 - top_p.sum(-1), **FP16)  # carrying exactly the leftover mass
    assert torch.allclose(q.sum(-1), torch.ones(len(idx)))


def test_ensemble_stores_log_of_averaged_probabilities(x):
    ts = [teacher(2), teacher(3)]
    tau = 2.0
    avg = torch.stack([torch.softmax(t(x).detach() / tau, -1) for t in ts]).mean(0)
    cache = TeacherCache.build(ts, x, temperature=tau)
    # exact at the cache temperature: softmax(τ·log p̄ / τ) = p̄
    assert torch.allclose(torch.softmax(cache.logits(torch.arange(37)) / tau, -1), avg, **FP16)
    assert "ensemble of 2" in cache.mode and "T=2" in cache.mode


def test_memory_versus_full_logits(x):
    t = teacher(4, c=50)
    n = len(x)
    top = TeacherCache.build([t], x, k=2)
    full = TeacherCache.build([t], x, k=None)
    assert top.bytes == n * (2 * 2 + 2 * 2 + 4)  # fp16 values + int16 index + fp32 leftover
    assert full.bytes == n * 50 * 2
    assert top.full_bytes == n * 50 * 4
    assert top.bytes < full.bytes < top.full_bytes
    assert "top-2 of 50" in top.mode


def test_save_load_roundtrip_progress_and_mismatch(tmp_path, x):
    t = teacher(5)
    t.train()
    seen = []
    cache = TeacherCache.build([t], x, k=4, batch_size=16, progress=lambda d, n: seen.append((d, n)))
    assert seen == [(16, 37), (32, 37), (37, 37)]
    assert t.training  # the teacher's mode is restored
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    back = TeacherCache.load(path, teachers=[t], x=x)
    idx = torch.arange(37)
    assert torch.equal(back.logits(idx), cache.logits(idx))
    assert back.k == 4 and back.num_classes == 10 and back.teacher_hashes == cache.teacher_hashes
    with pytest.raises(AttarError, match="teacher weights differ"):
        TeacherCache.load(path, teachers=[teacher(6)])
    with pytest.raises(AttarError, match="rows"):
        TeacherCache.load(path, x=x[:5])
    # load_or_build reuses a matching cache and rebuilds a stale one
    again, built = TeacherCache.load_or_build(path, [t], x, k=4)
    assert not built and torch.equal(again.logits(idx), cache.logits(idx))
    other, built = TeacherCache.load_or_build(path, [t], x, k=2)
    assert built and other.k == 2 and TeacherCache.load(path).k == 2


def test_bad_arguments(x):
    with pytest.raises(AttarError, match="exceeds"):
        TeacherCache.build([teacher(0)], x, k=11)
    with pytest.raises(AttarError, match="at least one teacher"):
        TeacherCache.build([], x)
    with pytest.raises(AttarError, match="every teacher"):
        TeacherCache.build([teacher(0, c=10), teacher(1, c=9)], x)


def test_fill_value_formula():
    # Hand check of f = log((1 − Σ top p) / (C − k)) on one row.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))

    class Fixed(nn.Module):
        def forward(self, x):
            return logits.expand(len(x), -1)

    cache = TeacherCache.build([Fixed()], torch.zeros(1, 1), k=2)
    out = cache.logits(torch.tensor([0]))[0]
    assert out[2].item() == pytest.approx(math.log(0.2 / 3), abs=1e-5)
    assert out[0].item() == pytest.approx(math.log(0.5), abs=1e-3)
