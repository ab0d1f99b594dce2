"""Divergence registry: values checked against numbers worked by hand, not against the same formula.

Two-class running example (teacher p = [0.8, 0.2], student q = [0.5, 0.5]); the logits are the
log-probabilities themselves (softmax is shift-invariant, so log p are valid logits):
    ln 1.6 = 0.470004, ln 0.4 = -0.916291, ln(5/8) = -0.470004, ln 2.5 = 0.916291
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attar.distill.divergences import DIVERGENCES, divergence, divergence_params, is_batchwise
from attar.errors import AttarError

ALL = DIVERGENCES.names()
PER_SAMPLE = [n for n in ALL if not is_batchwise(n)]

P = [0.8, 0.2]
Q = [0.5, 0.5]


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def val(name: str, q=Q, p=P, **kw) -> float:
    return divergence(name, logits(q), logits(p), **kw).item()


def test_registry_contents():
    assert set(ALL) == {
        "kl", "reverse_kl", "js", "gjsd", "skew_kl", "skew_reverse_kl", "tvd", "sinkhorn", "sinkhorn_batch",
    }
    assert is_batchwise("sinkhorn_batch") and not is_batchwise("kl")


# ---------------------------------------------------------------------------------------------
# Hand-computed two-class values
# ---------------------------------------------------------------------------------------------


def test_kl_by_hand():
    # KL(p||q) = 0.8 ln(0.8/0.5) + 0.2 ln(0.2/0.5) = 0.8*0.470004 - 0.2*0.916291 = 0.192745
    assert val("kl") == pytest.approx(0.192745, abs=1e-6)


def test_reverse_kl_by_hand():
    # KL(q||p) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.5*(-0.470004) + 0.5*0.916291 = 0.223144
    assert val("reverse_kl") == pytest.approx(0.223144, abs=1e-6)


def test_js_by_hand():
    # m = [0.65, 0.35]
    # KL(p||m) = 0.8 ln(0.8/0.65) + 0.2 ln(0.2/0.35) = 0.8*0.207639 + 0.2*(-0.559616) = 0.054188
    # KL(q||m) = 0.5 ln(0.5/0.65) + 0.5 ln(0.5/0.35) = 0.5*(-0.262364) + 0.5*0.356675 = 0.047156
    # JS = (0.054188 + 0.047156) / 2 = 0.050672
    assert val("js") == pytest.approx(0.050672, abs=1e-6)


def test_tvd_by_hand():
    # 1/2 (|0.8-0.5| + |0.2-0.5|) = 0.3
    assert val("tvd") == pytest.approx(0.3, abs=1e-12)


def test_skew_kl_by_hand():
    # alpha = 0.1: m = 0.1 p + 0.9 q = [0.53, 0.47]
    # KL(p||m) = 0.8 ln(0.8/0.53) + 0.2 ln(0.2/0.47) = 0.8*0.411734 + 0.2*(-0.854415) = 0.158505
    assert val("skew_kl", alpha=0.1) == pytest.approx(0.158505, abs=1e-6)
    # alpha = 0 is forward KL (0.192745 above); alpha = 1 is KL(p||p) = 0
    assert val("skew_kl", alpha=0.0) == pytest.approx(0.192745, abs=1e-6)
    assert val("skew_kl", alpha=1.0) == pytest.approx(0.0, abs=1e-12)


def test_skew_reverse_kl_by_hand():
    # alpha = 0.1: m = 0.1 q + 0.9 p = [0.77, 0.23]
    # KL(q||m) = 0.5 ln(0.5/0.77) + 0.5 ln(0.5/0.23) = 0.5*(-0.431783) + 0.5*0.776529 = 0.172373
    assert val("skew_reverse_kl", alpha=0.1) == pytest.approx(0.172373, abs=1e-6)
    assert val("skew_reverse_kl", alpha=0.0) == pytest.approx(0.223144, abs=1e-6)


def test_gjsd_endpoints_and_interior_by_hand():
    # beta = 0 -> forward KL, beta = 1 -> reverse KL (values above), beta = 1/2 -> JS.
    assert val("gjsd", beta=0.0) == pytest.approx(0.192745, abs=1e-6)
    assert val("gjsd", beta=1.0) == pytest.approx(0.223144, abs=1e-6)
    assert val("gjsd", beta=0.5) == pytest.approx(0.050672, abs=1e-6)
    # beta = 0.25: m = 0.25 p + 0.75 q = [0.575, 0.425]
    # KL(p||m) = 0.8 ln(0.8/0.575) + 0.2 ln(0.2/0.425) = 0.8*0.330242 + 0.2*(-0.753772) = 0.113439
    # KL(q||m) = 0.5 ln(0.5/0.575) + 0.5 ln(0.5/0.425) = 0.5*(-0.139762) + 0.5*0.162519 = 0.011378
    # JSD = 0.25*0.113439 + 0.75*0.011378 = 0.036894
    assert val("gjsd", beta=0.25) == pytest.approx(0.036894, abs=1e-6)


def test_gjsd_interior_tends_to_the_endpoints_when_rescaled():
    # GKD's limits: JSD_b / b -> KL(p||q) as b -> 0 and JSD_b / (1-b) -> KL(q||p) as b -> 1,
    # which fixes the orientation of the interior formula relative to the endpoint definitions.
    b = 1e-5
    assert val("gjsd", beta=b) / b == pytest.approx(0.192745, rel=1e-3)
    assert val("gjsd", beta=1 - b) / b == pytest.approx(0.223144, rel=1e-3)


def test_gjsd_matches_kl_and_reverse_kl_on_random_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 7, generator=g) * 3, torch.randn(6, 7, generator=g) * 3
    for temp in (1.0, 3.0):
        kw = dict(temperature=temp, reduction="none")
        torch.testing.assert_close(divergence("gjsd", s, t, beta=0.0, **kw), divergence("kl", s, t, **kw))
        torch.testing.assert_close(divergence("gjsd", s, t, beta=1.0, **kw), divergence("reverse_kl", s, t, **kw))
        torch.testing.assert_close(divergence("gjsd", s, t, beta=0.5, **kw), divergence("js", s, t, **kw))
        torch.testing.assert_close(divergence("skew_kl", s, t, alpha=0.0, **kw), divergence("kl", s, t, **kw))


# ---------------------------------------------------------------------------------------------
# Scaling, symmetry, bounds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kl_t2_scaling_matches_torch_kl_div(temp):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 10, generator=g) * 2, torch.randn(8, 10, generator=g) * 2
    ref = F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="batchmean") * temp**2
    torch.testing.assert_close(divergence("kl", s, t, temperature=temp), ref)


def test_t2_applies_to_kl_family_only():
    s, t = logits(Q), logits(P)
    # Same distributions at T=2 need logits 2*log p; then only the T^2 factor differs.
    for name in ("kl", "reverse_kl", "js", "gjsd", "skew_kl", "skew_reverse_kl"):
        assert divergence(name, 2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * val(name), rel=1e-9)
    for name in ("tvd", "sinkhorn"):
        assert divergence(name, 2 * s, 2 * t, temperature=2.0).item() == pytest.approx(val(name), rel=1e-9)


@pytest.mark.parametrize("name", ["js", "tvd", "sinkhorn"])
def test_symmetric(name):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 6, generator=g) * 4, torch.randn(5, 6, generator=g) * 4
    # Sinkhorn is symmetric once converged (20 iterations leave ~1e-3 of row-marginal error).
    kw = {"n_iters": 300, "reduction": "none"} if name == "sinkhorn" else {"reduction": "none"}
    torch.testing.assert_close(divergence(name, a, b, **kw), divergence(name, b, a, **kw), atol=1e-5, rtol=1e-5)


def test_bounds_js_ln2_tvd_1():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(64, 5, generator=g) * 30, torch.randn(64, 5, generator=g) * 30
    js = divergence("js", s, t, reduction="none")
    tvd = divergence("tvd", s, t, reduction="none")
    assert (js <= math.log(2) + 1e-6).all() and (js >= -1e-6).all()
    assert (tvd <= 1 + 1e-6).all() and (tvd >= 0).all()
    # Disjoint supports reach the bounds.
    a = torch.tensor([[1e4, -1e4]])
    b = torch.tensor([[-1e4, 1e4]])
    assert divergence("js", a, b).item() == pytest.approx(math.log(2), abs=1e-6)
    assert divergence("tvd", a, b).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_identical_logits_give_zero(name):
    g = torch.Generator().manual_seed(4)
    # Well-separated rows (distinct argmax, confident) keep sinkhorn_batch's entropic bias ~e^{-d/eps} tiny.
    x = torch.randn(4, 6, generator=g) + 12 * torch.eye(4, 6)
    tol = 1e-3 if name == "sinkhorn" else 1e-6  # sinkhorn: entropic bias, see next test
    for temp in (1.0, 2.0):
        assert abs(divergence(name, x, x.clone(), temperature=temp).item()) < tol


def test_sinkhorn_entropic_bias_on_identical_inputs_is_small_and_shrinks_with_eps():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(5))
    big = divergence("sinkhorn", x, x, epsilon=0.1).item()
    small = divergence("sinkhorn", x, x, epsilon=0.05).item()
    # Off-diagonal plan mass ~ (C-1) e^{-1/eps}: 4 * e^{-10} = 1.8e-4 for C = 5.
    assert 0 < big < 1e-3 and 0 <= small < big


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_nonnegative(name):
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(32, 7, generator=g) * 5, torch.randn(32, 7, generator=g) * 5
    assert (divergence(name, s, t, reduction="none") >= -1e-6).all()


# ---------------------------------------------------------------------------------------------
# Sinkhorn against exact optimal transport
# ---------------------------------------------------------------------------------------------


def test_sinkhorn_one_hots_with_zero_one_cost_is_one():
    # All mass moves from class 0 to class 1 at cost 1.
    s = torch.tensor([[-1e4, 1e4, -1e4]])
    t = torch.tensor([[1e4, -1e4, -1e4]])
    for eps in (0.1, 0.01):
        assert divergence("sinkhorn", s, t, epsilon=eps).item() == pytest.approx(1.0, abs=1e-6)


def test_sinkhorn_zero_one_cost_approaches_tvd():
    # Exact OT with the 0/1 cost moves only the surplus: 1/2 sum |p - q| = 0.3 here.
    v = val("sinkhorn", epsilon=0.01, n_iters=500)
    assert v == pytest.approx(0.3, abs=2e-3)
    # A converged entropic plan is feasible, so never cheaper than exact OT; at eps=0.1 the excess is
    # tiny here (off-diagonal odds P01*P10/(P00*P11) = e^{-2/eps} = 2e-9).
    assert 0.3 <= val("sinkhorn", n_iters=200) < 0.3 + 1e-6


def test_sinkhorn_abs_cost_matches_1d_wasserstein_by_hand():
    # p = [0.5, 0.3, 0.2], q = [0.2, 0.3, 0.5], cost |i - j|:
    # CDF_p = [0.5, 0.8, 1], CDF_q = [0.2, 0.5, 1] -> W1 = 0.3 + 0.3 + 0 = 0.6
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    v = divergence("sinkhorn", logits(q), logits(p), epsilon=0.01, n_iters=1000, cost="abs").item()
    assert v == pytest.approx(0.6, abs=5e-3)
    # the same through an explicit cost tensor
    m = torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])
    v2 = divergence("sinkhorn", logits(q), logits(p), epsilon=0.01, n_iters=1000, cost=m).item()
    assert v2 == pytest.approx(v, abs=1e-9)


def test_sinkhorn_batched_rows_are_independent():
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    full = divergence("sinkhorn", s, t, reduction="none")
    rows = torch.stack([divergence("sinkhorn", s[i : i + 1], t[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full, rows)


def test_sinkhorn_batch_positive_when_batches_differ():
    g = torch.Generator().manual_seed(8)
    t = torch.randn(6, 5, generator=g) * 3
    s = torch.randn(6, 5, generator=g) * 3
    assert divergence("sinkhorn_batch", s, t).item() > 0.05


def test_sinkhorn_batch_by_hand_two_samples():
    # Teacher rows one-hot at classes 0 and 1, student rows both uniform over 2 classes:
    # every L1 cost is |1-0.5| + |0-0.5| = 1, so any plan of mass 1 costs exactly 1.
    t = torch.tensor([[1e4, -1e4], [-1e4, 1e4]])
    s = torch.zeros(2, 2)
    assert divergence("sinkhorn_batch", s, t).item() == pytest.approx(1.0, abs=1e-6)


def test_sinkhorn_batch_ignores_the_pairing():
    # Matching is of the batch as a set: permuting the student rows leaves it unchanged.
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = divergence("sinkhorn_batch", s, t, n_iters=200).item()
    b = divergence("sinkhorn_batch", s[perm], t, n_iters=200).item()
    assert a == pytest.approx(b, rel=1e-5)
    # ...so a permuted copy of the teacher batch costs ~0 while per-sample sinkhorn does not.
    x = torch.randn(4, 6, generator=g) + 12 * torch.eye(4, 6)
    assert divergence("sinkhorn_batch", x[torch.tensor([2, 0, 3, 1])], x).item() < 1e-6
    assert divergence("sinkhorn", x[torch.tensor([2, 0, 3, 1])], x).item() > 0.5


# ---------------------------------------------------------------------------------------------
# Numerical robustness and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_gradients_finite_for_extreme_logits(name, temp):
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, -1e4], [1e4, -1e4, 5.0]], requires_grad=True)
    out = divergence(name, s, t, temperature=temp)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    assert t.grad is None  # the teacher is detached


@pytest.mark.parametrize("name", ALL)
def test_masked_class_is_same_as_dropping_it(name):
    # -inf on the same class in both models: no NaN, and the value ignores that class.
    g = torch.Generator().manual_seed(10)
    s, t = torch.randn(3, 4, generator=g) * 2, torch.randn(3, 4, generator=g) * 2
    ninf = torch.full((3, 1), float("-inf"))
    s_m = torch.cat([s, ninf], 1).requires_grad_()
    t_m = torch.cat([t, ninf], 1)
    masked = divergence(name, s_m, t_m)
    masked.backward()
    assert torch.isfinite(masked) and torch.isfinite(s_m.grad).all()
    assert masked.item() == pytest.approx(divergence(name, s, t).item(), abs=1e-5)


def test_kl_with_teacher_only_mask_is_finite():
    # Teacher gives class 2 zero mass: forward KL just skips it (0 * log 0 = 0).
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 0.0, float("-inf")]])
    out = divergence("kl", s, t)  # p = [1/2, 1/2, 0], q = [1/3]*3 -> ln(3/2)
    out.backward()
    assert out.item() == pytest.approx(math.log(1.5), abs=1e-6)
    assert torch.isfinite(s.grad).all()
    for name in ("js", "tvd", "skew_kl", "skew_reverse_kl", "sinkhorn", "gjsd"):
        assert torch.isfinite(divergence(name, s, t))


def test_half_precision_inputs_are_computed_in_float32():
    s = torch.randn(4, 5).half()
    t = torch.randn(4, 5).half()
    out = divergence("kl", s, t)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(divergence("kl", s.float(), t.float()).item(), rel=1e-6)


def test_gradient_descent_on_sinkhorn_moves_student_towards_teacher():
    t = torch.tensor([[3.0, 0.0, -2.0, 1.0]])
    s = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.SGD([s], lr=2.0)
    start = divergence("tvd", s, t).item()
    for _ in range(50):
        opt.zero_grad()
        divergence("sinkhorn", s, t).backward()
        opt.step()
    assert divergence("tvd", s, t).item() < 0.25 * start


# ---------------------------------------------------------------------------------------------
# API: reductions, params, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_reduction_none_shape_and_mean(name):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    per = divergence(name, s, t, reduction="none")
    assert per.shape == (7,)
    mean = divergence(name, s, t)
    assert mean.shape == ()
    torch.testing.assert_close(mean, per.mean())


def test_batchwise_rejects_reduction_none():
    s = torch.randn(3, 4)
    with pytest.raises(AttarError, match="per-sample"):
        divergence("sinkhorn_batch", s, s, reduction="none")
    assert divergence("sinkhorn_batch", s, s).shape == ()


def test_unknown_reduction():
    with pytest.raises(AttarError, match="reduction='sum'"):
        divergence("kl", torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum")


def test_unknown_name_lists_known_ones():
    with pytest.raises(AttarError) as e:
        divergence("wasserstein", torch.zeros(2, 3), torch.zeros(2, 3))
    msg = str(e.value)
    assert "wasserstein" in msg and "kl" in msg and "sinkhorn_batch" in msg and "gjsd" in msg
    with pytest.raises(AttarError):
        divergence_params("nope")


def test_unknown_param_is_named_with_the_accepted_ones():
    with pytest.raises(AttarError) as e:
        divergence("gjsd", torch.zeros(2, 3), torch.zeros(2, 3), betta=0.3)
    msg = str(e.value)
    assert "'betta'" in msg and "beta" in msg
    with pytest.raises(AttarError, match="'alpha'.*Accepted parameters: none"):
        DIVERGENCES.get("kl")(torch.zeros(2, 3), torch.zeros(2, 3), alpha=0.1)


def test_divergence_params():
    assert divergence_params("kl") == {}
    assert divergence_params("gjsd") == {"beta": 0.5}
    assert divergence_params("skew_kl") == {"alpha": 0.1}
    assert divergence_params("sinkhorn") == {"epsilon": 0.1, "n_iters": 20, "cost": "zero_one"}
    assert divergence_params("sinkhorn_batch") == {"epsilon": 0.1, "n_iters": 20}
    d = divergence_params("gjsd")
    d["beta"] = 9  # a copy: callers cannot corrupt the defaults
    assert divergence_params("gjsd") == {"beta": 0.5}


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("gjsd", {"beta": 1.5}, "beta"),
        ("skew_kl", {"alpha": -0.1}, "alpha"),
        ("sinkhorn", {"epsilon": 0.0}, "epsilon"),
        ("sinkhorn", {"n_iters": 0}, "n_iters"),
        ("sinkhorn_batch", {"n_iters": 2.5}, "n_iters"),
        ("sinkhorn", {"cost": "euclid"}, "cost"),
        ("sinkhorn", {"cost": torch.ones(2, 2)}, r"\[3, 3\]"),
        ("sinkhorn", {"cost": -torch.ones(3, 3)}, "non-negative"),
    ],
)
def test_bad_param_values(name, kw, match):
    with pytest.raises(AttarError, match=match):
        divergence(name, torch.zeros(2, 3), torch.zeros(2, 3), **kw)


@pytest.mark.parametrize(
    "s,t,temp,match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), 1.0, "same shape"),
        (torch.zeros(3), torch.zeros(3), 1.0, r"\[batch, classes\]"),
        (torch.zeros(2, 3), torch.zeros(4, 2, 3), 1.0, "teacher_logits"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 0.0, "temperature"),
        (torch.zeros(2, 3), torch.zeros(2, 3), float("nan"), "temperature"),
    ],
)
def test_bad_inputs(s, t, temp, match):
    with pytest.raises(AttarError, match=match):
        divergence("kl", s, t, temperature=temp)


def test_signature_is_introspectable():
    import inspect

    params = inspect.signature(DIVERGENCES.get("gjsd")).parameters
    assert list(params) == ["student_logits", "teacher_logits", "temperature", "reduction", "beta"]


def test_divergence_fields_come_from_the_signature_like_any_method_family():
    from attar.distill.divergences import check_divergence_args

    assert DIVERGENCES.fields("kl") == {}
    rows = DIVERGENCES.fields("sinkhorn")
    assert list(rows) == ["epsilon", "n_iters", "cost"]
    assert rows["n_iters"] == {"type": "int", "default": 20, "required": False, "description": ""}
    assert {k: r["default"] for k, r in rows.items()} == divergence_params("sinkhorn")
    assert DIVERGENCES.parse("gjsd", {"beta": 0.3}).beta == 0.3
    check_divergence_args("sinkhorn", {"cost": torch.ones(3, 3), "n_iters": 5})  # a tensor cost is a valid value
    with pytest.raises(AttarError, match=r"divergence 'sinkhorn': field 'n_iters' = 'many'"):
        check_divergence_args("sinkhorn", {"n_iters": "many"})
    with pytest.raises(AttarError, match=r"does not accept 'beta'\. Accepted parameters: epsilon \(float, default 0.1\)"):
        divergence("sinkhorn_batch", torch.zeros(2, 3), torch.zeros(2, 3), beta=0.1)
