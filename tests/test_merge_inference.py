"""Test-time merging (T³ / T³_B) and logit fusion (EFT) against independent computations on tiny models."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attar.errors import AttarError
from attar.merge import (
    EmulatedFineTune,
    LogitArithmetic,
    TestTimeMerge,
    eft_log_probs,
    js_divergence,
    static_interpolation,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def tiny_cnn(seed: int, norm: str = "batch") -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    layers.append(nn.BatchNorm2d(4) if norm == "batch" else nn.GroupNorm(2, 4))
    layers += [nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)]
    m = nn.Sequential(*layers)
    if norm == "batch":  # non-trivial running statistics, so interpolating buffers matters
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].num_batches_tracked.fill_(seed)
    return m


def jsd_by_hand(za: torch.Tensor, zb: torch.Tensor) -> list[float]:
    """Per row, in probability space with Python floats (unlike the log-space implementation)."""
    out = []
    for a, b in zip(za.tolist(), zb.tolist()):
        ea, eb = [math.exp(v) for v in a], [math.exp(v) for v in b]
        p, q = [v / sum(ea) for v in ea], [v / sum(eb) for v in eb]
        m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
        out.append(0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m)))
    return out


def merged_copy(expert: nn.Module, generalist: nn.Module, lam: float) -> nn.Module:
    """A real model holding (1 − λ)·expert + λ·generalist, built with load_state_dict."""
    m = copy.deepcopy(expert)
    g = generalist.state_dict()
    sd = {k: ((1 - lam) * v + lam * g[k]) if v.is_floating_point() else v for k, v in expert.state_dict().items()}
    m.load_state_dict(sd)
    return m.eval()


def test_js_divergence_matches_hand_computation_and_bounds():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5) * 3, torch.randn(6, 5) * 3
    torch.testing.assert_close(js_divergence(a, b), torch.tensor(jsd_by_hand(a, b)), rtol=1e-5, atol=1e-6)
    assert float(js_divergence(a, a).abs().max()) < 1e-6
    far = js_divergence(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    assert abs(float(far) - math.log(2)) < 1e-5  # disjoint supports reach ln 2
    seq = js_divergence(a.reshape(2, 3, 5), b.reshape(2, 3, 5))  # [B, T, V] -> mean over tokens
    torch.testing.assert_close(seq, js_divergence(a, b).reshape(2, 3).mean(1))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_t3_per_sample_equals_one_merged_model_per_input(norm):
    g, e = tiny_cnn(1, norm), tiny_cnn(2, norm)
    x = torch.rand(7, 1, 8, 8)
    t3 = TestTimeMerge(g, e, mode="sample", scale=4.0, chunk_size=3).eval()
    out = t3(x)
    with torch.no_grad():
        lam = [min(1.0, 4.0 * j / math.log(2)) for j in jsd_by_hand(g.eval()(x), e.eval()(x))]
        want = torch.cat([merged_copy(e, g, lam[i])(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(t3.last_lambda, torch.tensor(lam), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert not out.requires_grad
    assert len(set(round(v, 6) for v in lam)) > 1  # really per sample
    loop = TestTimeMerge(g, e, mode="sample", scale=4.0, vectorize=False)(x)
    torch.testing.assert_close(loop, out, rtol=1e-4, atol=1e-5)


def test_t3_batch_uses_the_mean_coefficient_and_one_forward():
    g, e = tiny_cnn(3), tiny_cnn(4)
    x = torch.rand(5, 1, 8, 8)
    t3b = TestTimeMerge(g, e, mode="batch", scale=2.0)
    out = t3b(x)
    with torch.no_grad():
        lam = sum(min(1.0, 2.0 * j / math.log(2)) for j in jsd_by_hand(g.eval()(x), e.eval()(x))) / len(x)
        want = merged_copy(e, g, lam)(x)
    assert abs(float(t3b.last_lambda) - lam) < 1e-6
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_t3_limits_identical_models_clipping_and_modes_restored():
    e = tiny_cnn(5)
    g = copy.deepcopy(e)
    x = torch.rand(4, 1, 8, 8)
    e.train()
    t3 = TestTimeMerge(g, e)
    out = t3(x)
    assert float(t3.last_lambda.abs().max()) < 1e-6  # they agree: the expert answers
    torch.testing.assert_close(out, copy.deepcopy(e).eval()(x).detach())
    assert e.training and g.training  # modes restored
    g2 = tiny_cnn(6)
    t3 = TestTimeMerge(g2, e, scale=1e6, min_lambda=0.2, max_lambda=0.7)
    t3(x)
    assert float(t3.last_lambda.min()) >= 0.2 and float(t3.last_lambda.max()) <= 0.7 + 1e-7
    t3 = TestTimeMerge(g2, e, scale=0.0, min_lambda=0.3, max_lambda=0.3)  # a fixed λ is static interpolation
    torch.testing.assert_close(t3(x), merged_copy(e, g2, 0.3)(x).detach(), rtol=1e-4, atol=1e-5)
    sd = static_interpolation(e.state_dict(), g2.state_dict(), 0.3)
    assert sd["1.num_batches_tracked"] == e.state_dict()["1.num_batches_tracked"]


def test_t3_errors_and_hf_style_outputs():
    with pytest.raises(AttarError, match="same architecture"):
        TestTimeMerge(tiny_cnn(1), nn.Sequential(nn.Flatten(), nn.Linear(64, 5)))
    with pytest.raises(AttarError, match="mode"):
        TestTimeMerge(tiny_cnn(1), tiny_cnn(2), mode="token")

    class HFStyle(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return SimpleNamespace(logits=self.lin(x))

    g, e = HFStyle(1), HFStyle(2)
    x = torch.randn(3, 3)
    out = TestTimeMerge(g, e, scale=3.0)(x)
    with torch.no_grad():
        lam = [min(1.0, 3.0 * j / math.log(2)) for j in jsd_by_hand(g(x).logits, e(x).logits)]
        want = torch.stack([(1 - l) * e.lin(x[i]) + l * g.lin(x[i]) for i, l in enumerate(lam)])  # linear model: merge = blend
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- logit fusion / EFT


def test_eft_matches_the_probability_formula():
    torch.manual_seed(0)
    big, ft, ref = (nn.Linear(6, 4) for _ in range(3))
    x = torch.randn(5, 6)
    beta = 0.7
    out = EmulatedFineTune(big, ft, ref, beta=beta)(x)
    with torch.no_grad():
        pb, pf, pr = (torch.softmax(m(x).double(), -1) for m in (big, ft, ref))
        unnorm = pb * (pf / pr) ** beta  # p_big · (p_ft / p_ref)^β, then normalise
        want = unnorm / unnorm.sum(-1, keepdim=True)
    torch.testing.assert_close(out.exp().double(), want, rtol=1e-5, atol=1e-6)
    assert not out.requires_grad
    # β = 0 is the large base; a large base equal to the small base gives the small fine-tune.
    torch.testing.assert_close(EmulatedFineTune(big, ft, ref, beta=0.0)(x), torch.log_softmax(big(x), -1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(EmulatedFineTune(ref, ft, ref)(x), torch.log_softmax(ft(x), -1).detach(), atol=1e-5, rtol=1e-5)


def test_logit_arithmetic_general_weights_sequences_and_mismatch():
    torch.manual_seed(1)
    a, b = nn.Linear(3, 7), nn.Linear(3, 7)
    x = torch.randn(2, 4, 3)  # [batch, tokens, features] -> [batch, tokens, vocab]
    out = LogitArithmetic([a, b], [0.5, 0.5], temperature=2.0)(x)
    with torch.no_grad():
        geo = (torch.softmax(a(x) / 2, -1) * torch.softmax(b(x) / 2, -1)).sqrt()
        torch.testing.assert_close(out.exp(), geo / geo.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
        z = [a(x), b(x), a(x)]
        torch.testing.assert_close(eft_log_probs(*z), torch.log_softmax(b(x), -1), rtol=1e-5, atol=1e-5)
    with pytest.raises(AttarError, match="vocabulary"):
        LogitArithmetic([a, nn.Linear(3, 9)], [1, 1])(x)
    with pytest.raises(AttarError, match="one weight per model"):
        LogitArithmetic([a, b], [1.0])
