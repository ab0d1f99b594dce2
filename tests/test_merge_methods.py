"""Each merge method against an independent computation (loops, closed forms, hand-worked values)."""

from __future__ import annotations

import math

import pytest
import torch

from attar.errors import AttarError
from attar.merge import merge_state_dicts
from attar.merge.config import Condition, evaluate_setting, layer_position, resolve_parameters
from attar.merge.methods import (
    MERGE_METHODS,
    diagonal_fisher,
    fisher_merge,
    greedy_soup,
    lcsc_search,
    slerp_tensors,
    wise_ft_sweep,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def rand_sd(seed: int, shapes=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"layers.0.w": (3, 4), "layers.1.w": (3, 4), "head.b": (5,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# ---------------------------------------------------------------- linear / task arithmetic / ft transfer


def test_linear_weighted_average_and_unnormalized():
    a, b, c = rand_sd(1), rand_sd(2), rand_sd(3)
    out = merge_state_dicts("linear", [a, b, c], model_parameters=[{"weight": 2}, {"weight": 1}, {"weight": 1}])
    for k in a:
        expected = torch.empty_like(a[k])
        for idx in range(a[k].numel()):  # element by element, unlike the implementation
            expected.view(-1)[idx] = (2 * a[k].view(-1)[idx] + b[k].view(-1)[idx] + c[k].view(-1)[idx]) / 4
        torch.testing.assert_close(out[k], expected)
    out = merge_state_dicts("linear", [a, b], parameters={"weight": 0.5, "normalize": False})
    for k in a:
        torch.testing.assert_close(out[k], 0.5 * a[k] + 0.5 * b[k])


def test_linear_base_is_an_input_and_zero_weight_sum_fails():
    a, base = rand_sd(1), rand_sd(9)
    out = merge_state_dicts("linear", [a], base=base)
    for k in a:
        torch.testing.assert_close(out[k], (a[k] + base[k]) / 2)
    with pytest.raises(AttarError, match="sum to zero"):
        merge_state_dicts("linear", [a, rand_sd(2)], model_parameters=[{"weight": 1}, {"weight": -1}])


def test_task_arithmetic():
    base, a, b = rand_sd(0), rand_sd(1), rand_sd(2)
    out = merge_state_dicts("task_arithmetic", [a, b], base=base, model_parameters=[{"weight": 0.6}, {"weight": 0.3}], parameters={"lambda": 0.5})
    for k in base:
        tau = 0.6 * (a[k] - base[k]) + 0.3 * (b[k] - base[k])
        torch.testing.assert_close(out[k], base[k] + 0.5 * tau)
    out = merge_state_dicts("task_arithmetic", [a, b], base=base, model_parameters=[{"weight": 0.6}, {"weight": 0.3}], parameters={"normalize": True})
    for k in base:
        torch.testing.assert_close(out[k], base[k] + (0.6 * (a[k] - base[k]) + 0.3 * (b[k] - base[k])) / 0.9)


def test_ft_transfer():
    new_base, old_base, old_ft = rand_sd(0), rand_sd(1), rand_sd(2)
    out = merge_state_dicts("ft_transfer", [old_ft], base=new_base, extras={"old_base": old_base})
    for k in new_base:
        torch.testing.assert_close(out[k], new_base[k] + old_ft[k] - old_base[k])


# ---------------------------------------------------------------- TIES


def ties_reference(base, models, weights, density):
    """TIES by explicit loops over elements (Yadav et al., Algorithm 1, with mergekit's weighting)."""
    n = base.numel()
    trimmed = []
    for m in models:
        delta = [float(m.view(-1)[i] - base.view(-1)[i]) for i in range(n)]
        k = max(1, int(density * n))
        keep = sorted(range(n), key=lambda i: -abs(delta[i]))[:k]
        trimmed.append([delta[i] if i in keep else 0.0 for i in range(n)])
    out = []
    for i in range(n):
        vals = [w * t[i] for w, t in zip(weights, trimmed)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        num = sum(v for v in vals if v != 0 and math.copysign(1, v) == sign)
        den = sum(w for w, v in zip(weights, vals) if v != 0 and math.copysign(1, v) == sign)
        out.append(float(base.view(-1)[i]) + (num / den if den else 0.0))
    return torch.tensor(out).reshape(base.shape)


def test_ties_hand_worked_2x3():
    base = torch.zeros(2, 3)
    m1 = torch.tensor([[3.0, -1.0, 0.5], [-2.0, 4.0, 0.1]])
    m2 = torch.tensor([[-1.0, -2.0, 0.2], [3.0, -0.5, 0.3]])
    # density 0.5 keeps 3 of 6: m1 -> {4, 3, -2}, m2 -> {3, -2, -1}; elected signs from the sums
    # [[2, -2, 0], [1, 4, 0]] are [[+, -, +], [+, +, +]]; disjoint mean of the agreeing entries:
    expected = torch.tensor([[3.0, -2.0, 0.0], [3.0, 4.0, 0.0]])
    out = merge_state_dicts("ties", [{"w": m1}, {"w": m2}], base={"w": base}, parameters={"density": 0.5})
    torch.testing.assert_close(out["w"], expected)
    torch.testing.assert_close(ties_reference(base, [m1, m2], [1, 1], 0.5), expected)


def test_ties_random_against_loops():
    base, a, b, c = rand_sd(0), rand_sd(1), rand_sd(2), rand_sd(3)
    w = [1.0, 0.5, 0.8]
    out = merge_state_dicts(
        "ties", [a, b, c], base=base, model_parameters=[{"weight": x} for x in w], parameters={"density": 0.4}
    )
    for k in base:
        torch.testing.assert_close(out[k], ties_reference(base[k], [a[k], b[k], c[k]], w, 0.4))


# ---------------------------------------------------------------- DARE


def test_dare_keeps_density_fraction_rescaled_and_is_seeded():
    base = {"a.w": torch.zeros(200, 100), "b.w": torch.zeros(200, 100)}
    ft = {"a.w": torch.ones(200, 100), "b.w": torch.ones(200, 100)}
    out = merge_state_dicts("dare_linear", [ft], base=base, parameters={"density": 0.3}, seed=7)
    for k in base:
        kept_vals = out[k][out[k] != 0]
        torch.testing.assert_close(kept_vals, torch.full_like(kept_vals, 1 / 0.3))
        kept = (out[k] != 0).float().mean().item()
        assert abs(kept - 0.3) < 0.02  # 20k Bernoulli(0.3) draws: std 0.003
    assert not torch.equal(out["a.w"] != 0, out["b.w"] != 0)  # masks differ per tensor name
    again = merge_state_dicts("dare_linear", [ft], base=base, parameters={"density": 0.3}, seed=7)
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = merge_state_dicts("dare_linear", [ft], base=base, parameters={"density": 0.3}, seed=8)
    assert not torch.equal(out["a.w"], other["a.w"])


def test_dare_unbiased_over_seeds_and_ties_variant():
    base, a, b = rand_sd(0), rand_sd(1), rand_sd(2)
    acc = {k: torch.zeros_like(v) for k, v in base.items()}
    n = 400
    for s in range(n):
        out = merge_state_dicts("dare_linear", [a, b], base=base, parameters={"density": 0.5}, seed=s)
        for k in acc:
            acc[k] += out[k] / n
    for k in base:
        expected = base[k] + (a[k] - base[k]) + (b[k] - base[k])
        torch.testing.assert_close(acc[k], expected, atol=0.35, rtol=0)
    full = merge_state_dicts("dare_ties", [a, b], base=base, parameters={"density": 1.0, "normalize": True})
    ties = merge_state_dicts("ties", [a, b], base=base, parameters={"density": 1.0})
    for k in base:  # with nothing dropped DARE-TIES is TIES
        torch.testing.assert_close(full[k], ties[k])


# ---------------------------------------------------------------- breadcrumbs


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = {"w": torch.zeros(1, 10)}
    ft = {"w": torch.arange(1, 11, dtype=torch.float32).reshape(1, 10)}
    out = merge_state_dicts("breadcrumbs", [ft], base=base, parameters={"density": 0.5, "gamma": 0.1})
    # 10 entries: drop the top 1 (gamma) and the bottom 4, keeping 5 (density).
    torch.testing.assert_close(out["w"], torch.tensor([[0, 0, 0, 0, 5, 6, 7, 8, 9, 0]], dtype=torch.float32))


# ---------------------------------------------------------------- SLERP


def test_slerp_orthogonal_vectors_follow_the_circle():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        expected = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)])
        torch.testing.assert_close(slerp_tensors(t, v0, v1), expected)
    out = merge_state_dicts("slerp", [{"w": 3 * v1}], base={"w": 3 * v0}, parameters={"t": 0.5})
    assert out["w"].norm().item() == pytest.approx(3.0)


def test_slerp_parallel_falls_back_to_linear():
    v0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = slerp_tensors(0.3, v0, 2 * v0)
    torch.testing.assert_close(out, 0.7 * v0 + 0.3 * 2 * v0)
    torch.testing.assert_close(slerp_tensors(0.3, torch.zeros(3), torch.zeros(3)), torch.zeros(3))


def test_slerp_needs_exactly_two_models():
    with pytest.raises(AttarError, match="base model"):
        merge_state_dicts("slerp", [rand_sd(1)])


# ---------------------------------------------------------------- per-tensor parameters


def test_evaluate_setting_filters_and_gradients():
    cond = [Condition(filter="mlp", value=0.5), Condition(value=[0.0, 1.0])]
    assert evaluate_setting(cond, "layers.1.mlp.w", 0.7) == 0.5
    assert evaluate_setting(cond, "layers.1.attn.w", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0, 0.5, 1.0], "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting([1, 0.7, 0.1], "x", 0.5) == pytest.approx(0.7)
    assert evaluate_setting([Condition(filter="mlp", value=1)], "attn", 0) is None
    assert evaluate_setting(0.3, "x", 0.9) == 0.3
    assert layer_position("model.layers.2.mlp.w", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("transformer.h.1.attn.c_attn.weight", 1) == 1.0


def test_parameter_precedence_model_then_global_then_default():
    ties = MERGE_METHODS.get("ties")
    opts, per = resolve_parameters(
        ties,
        "layers.0.mlp.w",
        0.0,
        [{"density": [Condition(filter="attn", value=0.1)]}, {"weight": 0.3}, None],
        {"density": 0.6, "normalize": False},
    )
    assert opts == {"normalize": False, "lambda": 1.0, "rescale": False}
    assert per[0] == {"weight": 1.0, "density": 0.6}  # filter did not match: falls through to global
    assert per[1] == {"weight": 0.3, "density": 0.6}
    assert per[2] == {"weight": 1.0, "density": 0.6}


def test_gradient_parameters_in_memory():
    base = {f"layers.{i}.w": torch.zeros(4) for i in range(3)}
    ft = {f"layers.{i}.w": torch.ones(4) for i in range(3)}
    out = merge_state_dicts("task_arithmetic", [ft], base=base, model_parameters=[{"weight": [0.0, 1.0]}])
    assert [out[f"layers.{i}.w"][0].item() for i in range(3)] == pytest.approx([0.0, 0.5, 1.0])


def test_model_level_methods_refuse_tensor_path_and_unknown_method():
    with pytest.raises(AttarError, match="held-out data"):
        merge_state_dicts("greedy_soup", [rand_sd(1)])
    with pytest.raises(AttarError, match="Known merge methods"):
        merge_state_dicts("frankenstein", [rand_sd(1)])


def test_storage_dtype_preserved_and_arithmetic_in_float32():
    a = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "step": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 4.0], dtype=torch.bfloat16), "step": torch.tensor(5)}
    out = merge_state_dicts("linear", [a, b])
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [1.5, 3.0]
    assert out["step"].item() == 3  # non-float tensors come from the reference model


# ---------------------------------------------------------------- model-level methods


def scalar_sd(v: float):
    return {"theta": torch.tensor([v])}


def test_greedy_soup_decisions():
    ingredients = [scalar_sd(1.0), scalar_sd(-1.5), scalar_sd(8.0), scalar_sd(0.5)]

    def evaluate(sd):
        return -float(sd["theta"]) ** 2

    res = greedy_soup(ingredients, evaluate)
    # Own scores -1, -2.25, -64, -0.25 -> order 0.5, 1.0, -1.5, 8.0. Soup {0.5} scores -0.25;
    # +1.0: mean 0.75 (-0.5625) rejected; +(-1.5): mean -0.5 (-0.25, equal: kept, the paper's >=);
    # +8.0: mean 7/3 rejected.
    assert res.info["ingredients"] == [3, 1]
    assert [h["kept"] for h in res.info["history"]] == [True, False, True, False]
    assert res.state_dict["theta"].item() == -0.5
    assert res.info["soup_score"] == -0.25


def test_greedy_soup_on_tiny_finetuned_classifiers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    xtr, ytr, xval, yval = x[:300], y[:300], x[300:], y[300:]
    torch.manual_seed(0)
    init = torch.nn.Linear(2, 2).state_dict()
    ingredients = []
    for lr, steps in [(0.05, 30), (0.2, 30), (1.0, 30), (3.0, 10), (0.5, 60)]:
        model = torch.nn.Linear(2, 2)
        model.load_state_dict(init)
        for _ in range(steps):  # plain SGD by hand (torch.optim's first use imports a lot)
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
        ingredients.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def evaluate(sd):
        return (torch.nn.functional.linear(xval, sd["weight"], sd["bias"]).argmax(1) == yval).float().mean().item()

    res = greedy_soup(ingredients, evaluate)
    assert res.info["soup_score"] >= max(res.info["ingredient_scores"])
    assert evaluate(res.state_dict) == pytest.approx(res.info["soup_score"])


def test_fisher_merge_closed_form_and_isotropic_case():
    a, b = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(2)}
    fa, fb = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}
    res = fisher_merge([a, b], [fa, fb], fisher_floor=0.0)
    torch.testing.assert_close(res.state_dict["w"], torch.tensor([(1 * 1 + 3 * 3) / 4, (3 * 2 + 1 * -2) / 4]))
    assert res.state_dict["n"].item() == 1
    same = fisher_merge([a, b], [{"w": torch.ones(2)}, {"w": torch.ones(2)}])
    torch.testing.assert_close(same.state_dict["w"], (a["w"] + b["w"]) / 2)
    zero = fisher_merge([a, b], [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}])  # floor -> plain average
    torch.testing.assert_close(zero.state_dict["w"], (a["w"] + b["w"]) / 2)
    with pytest.raises(AttarError, match="one per model"):
        fisher_merge([a, b], [fa])


def test_diagonal_fisher_matches_closed_form_for_softmax_regression():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    x = torch.randn(10, 3)
    fisher = diagonal_fisher(model, [x[:6], x[6:]], labels="expected")
    p = torch.softmax(model(x), dim=1).detach()
    # d log p_c / dW_kj = (1[k=c] - p_k) x_j  =>  E_c[(.)^2] = p_k (1 - p_k) x_j^2
    expected_w = (p * (1 - p)).T @ (x**2) / len(x)
    expected_b = (p * (1 - p)).mean(0)
    torch.testing.assert_close(fisher["weight"], expected_w)
    torch.testing.assert_close(fisher["bias"], expected_b)
    sampled = diagonal_fisher(model, [(x, torch.zeros(10, dtype=torch.long))], labels="empirical", max_examples=4)
    assert sampled["weight"].shape == (4, 3) and model.training


def test_wise_ft_sweep_picks_best_alpha():
    res = wise_ft_sweep(scalar_sd(0.0), scalar_sd(1.0), evaluate=lambda sd: -(float(sd["theta"]) - 0.3) ** 2)
    assert res.info["alpha"] == pytest.approx(0.3)
    assert res.state_dict["theta"].item() == pytest.approx(0.3)
    assert len(res.info["curve"]) == 11
    fixed = wise_ft_sweep(scalar_sd(0.0), scalar_sd(2.0), alpha=0.25)
    assert fixed.state_dict["theta"].item() == pytest.approx(0.5)


def test_lcsc_search_improves_on_last_checkpoint():
    cps = [scalar_sd(0.0), scalar_sd(1.0), scalar_sd(2.0)]

    def evaluate(sd):
        return -(float(sd["theta"]) - 1.5) ** 2

    res = lcsc_search(cps, evaluate, iterations=30, population=4, seed=0)
    assert res.info["score"] > -0.25  # the last checkpoint alone scores -0.25
    assert sum(res.info["coefficients"]) == pytest.approx(1.0)
    assert abs(res.state_dict["theta"].item() - 1.5) < 0.1
    again = lcsc_search(cps, evaluate, iterations=30, population=4, seed=0)
    assert again.info["coefficients"] == res.info["coefficients"]


def test_magnitude_mask_keeps_exactly_k_even_with_ties():
    from attar.merge.methods.base import magnitude_mask

    mask = magnitude_mask(torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5, -2.0]), 0.5)
    assert int(mask.sum()) == 3 and bool(mask[5]) and not bool(mask[4])
    assert int(magnitude_mask(torch.randn(7), 0.01).sum()) == 1  # at least one entry survives


def test_fisher_method_through_registry_with_an_estimator():
    torch.manual_seed(0)
    models = [torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)]
    x = torch.randn(8, 3)
    estimator = lambda m: diagonal_fisher(m, [x], labels="expected")  # noqa: E731  (a FisherEstimator)
    sds = [m.state_dict() for m in models]
    res = MERGE_METHODS.get("fisher").run(sds, fisher=estimator, models=models)
    direct = fisher_merge(sds, [estimator(m) for m in models])
    for k in sds[0]:
        torch.testing.assert_close(res.state_dict[k], direct.state_dict[k])
    with pytest.raises(AttarError, match="Fisher estimates"):
        MERGE_METHODS.get("fisher").run(sds)


def test_magnitude_mask_keeps_exactly_k_with_ties_in_index_order():
    from attar.merge.methods.base import magnitude_mask

    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, -2.0, 0.5])
    assert magnitude_mask(x, 3 / 7).tolist() == [True, False, True, True, False, False, False]
    assert magnitude_mask(torch.ones(2, 3), 0.5).reshape(-1).tolist() == [True, True, True, False, False, False]
    g = torch.Generator().manual_seed(0)
    y = torch.randn(1000, generator=g)
    top = set(torch.argsort(y.abs(), descending=True)[:300].tolist())  # no ties: the same set as a full sort
    assert set(torch.nonzero(magnitude_mask(y, 0.3)).flatten().tolist()) == top
