"""Real-data wiring of the model-level methods: evaluators, vectorised Fisher, fine-tuned ingredients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attar.errors import AttarError
from attar.merge import accuracy_evaluator, finetune, fisher_estimator, greedy_soup, state_dicts
from attar.merge.methods import diagonal_fisher


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)
    )


def test_accuracy_evaluator_scores_each_state_dict_on_the_split():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    y[0] = -1  # unlabeled rows are ignored
    ev = accuracy_evaluator(model, x, y)
    other = nn.Linear(5, 3)
    for m in (model, other):
        want = float((m(x[1:]).argmax(1) == y[1:]).float().mean())
        assert ev(m.state_dict()) == pytest.approx(want)
    nll = accuracy_evaluator(model, x, y, metric="nll")(model.state_dict())
    with torch.no_grad():
        want = -float(torch.nn.functional.cross_entropy(model(x[1:]), y[1:]))
    assert nll == pytest.approx(want, rel=1e-5)
    assert model.weight.grad is None
    with pytest.raises(AttarError, match="unexpected|does not"):
        accuracy_evaluator(model, x, y, strict=False)({"extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("labels", ["expected", "empirical"])
def test_vectorised_fisher_equals_the_per_example_loop(labels):
    model = small_cnn(1)
    x, y = torch.rand(11, 1, 6, 6), torch.randint(0, 4, (11,))
    fast = fisher_estimator(x, y, labels=labels, batch_size=4)(model)
    slow = diagonal_fisher(model, [(x[:6], y[:6]), (x[6:], y[6:])], labels=labels)
    assert set(fast) == set(slow)
    for k in slow:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-7)


def test_fisher_include_sampled_and_errors():
    model = small_cnn(2)
    x = torch.rand(9, 1, 6, 6)
    f = fisher_estimator(x, include=["0.", "1."], labels="sampled", seed=3)
    a, b = f(model), f(model)
    assert set(a) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # seeded
        assert bool((a[k] >= 0).all())
    with pytest.raises(AttarError, match="needs the labels"):
        fisher_estimator(x, labels="empirical")
    with pytest.raises(AttarError, match="no trainable parameter"):
        fisher_estimator(x, include=["nothing."])(model)


def test_finetune_is_deterministic_and_feeds_greedy_soup():
    torch.manual_seed(0)
    x = torch.randn(96, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    cfg = {"epochs": 2, "batch_size": 32, "lr": 0.05}
    a = finetune(base, x, y, cfg, seed=1)
    b = finetune(base, x, y, cfg, seed=1)
    c = finetune(base, x, y, cfg | {"lr": 0.01}, seed=2)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k])
    assert not torch.equal(a.state_dict()["0.weight"], base.state_dict()["0.weight"])  # the template is untouched
    ev = accuracy_evaluator(base, x, y)
    res = greedy_soup(state_dicts([a, c]), ev)
    assert res.info["soup_score"] >= max(ev(a.state_dict()), ev(c.state_dict()))


def test_merge_models_by_name_for_a_recipe_stage():
    from types import SimpleNamespace

    from attar.data import Split
    from attar.merge.stage import merge_models

    torch.manual_seed(0)
    x = torch.randn(80, 4)
    y = (x[:, 0] > 0).long()
    split = Split(x, y, ["a", "b"])
    bundle = SimpleNamespace(name="toy", train=split, val=split)
    base = nn.Linear(4, 2)
    models = [finetune(base, x, y, {"epochs": 1, "batch_size": 16, "lr": lr}, seed=i) for i, lr in enumerate([0.05, 0.01])]
    lin, _ = merge_models("linear", models)
    torch.testing.assert_close(lin.weight, (models[0].weight + models[1].weight) / 2)
    ta, _ = merge_models("task_arithmetic", models, base=base, parameters={"lambda": 0.5})
    torch.testing.assert_close(ta.weight, base.weight + 0.5 * (models[0].weight + models[1].weight - 2 * base.weight))
    soup, info = merge_models("greedy_soup", models, bundle=bundle)
    assert info["method"] == "greedy_soup" and info["ingredients"]
    fis, _ = merge_models("fisher", models, bundle=bundle, parameters={"examples": 16, "labels": "empirical"})
    ev = accuracy_evaluator(base, x, y)
    assert ev(fis.state_dict()) > 0.5
    wise, info = merge_models("wise_ft", models[:1], base=base, bundle=bundle, parameters={"alphas": [0.0, 0.5, 1.0]})
    assert info["alpha"] in (0.0, 0.5, 1.0)
    with pytest.raises(AttarError, match="unknown parameter"):
        merge_models("greedy_soup", models, bundle=bundle, parameters={"densty": 0.5})
    with pytest.raises(AttarError, match="needs data"):
        merge_models("greedy_soup", models)
    with pytest.raises(AttarError, match="needs a base"):
        merge_models("ties", models)
