"""RegMean, RegMean++ and AdaMerging: closed forms by hand, identities, FusionBench's numbers, the recipe stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from attar.errors import AttarError
from attar.merge.methods import adamerging_merge, input_grams, regmean_merge, regmean_plusplus_merge

GOLDEN = Path(__file__).parent / "golden" / "fusionbench"


def _linear(seed: int, i: int = 4, o: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def test_regmean_closed_form_by_hand():
    """One linear layer, two models, each with its own inputs: W* = (Σ W_i G̃_i)(Σ G̃_i)^-1, solved here by hand."""
    a, b = _linear(0), _linear(1)
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(50, 4, generator=g) + 1, 2 * torch.randn(30, 4, generator=g)
    for alpha in (1.0, 0.6):
        grams = [input_grams(m, x, batch_size=7, max_examples=None) for m, x in ((a, xa), (b, xb))]
        got = regmean_merge([a.state_dict(), b.state_dict()], grams, alpha=alpha)
        ga, gb = xa.T @ xa / 50, xb.T @ xb / 30
        shrink = lambda G: alpha * G + (1 - alpha) * torch.diag(torch.diag(G))  # noqa: E731
        lhs = shrink(ga) + shrink(gb)
        want = torch.linalg.solve(lhs, shrink(ga) @ a.weight.detach().T + shrink(gb) @ b.weight.detach().T).T
        torch.testing.assert_close(got.state_dict["weight"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.state_dict["bias"], (a.bias + b.bias).detach() / 2)  # biases averaged
        assert got.info["regmean"] == [""] and got.info["averaged"] == ["bias"]
    # the merged layer minimises Σ_i ||X_i W_iᵀ − X_i Wᵀ||² (α = 1): its gradient there is zero
    w = got = regmean_merge([a.state_dict(), b.state_dict()], grams, alpha=1.0).state_dict["weight"].requires_grad_(True)
    loss = sum(((x @ m.weight.detach().T - x @ w.T) ** 2).sum() / len(x) for m, x in ((a, xa), (b, xb)))
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-4


def test_grams_stream_batches_and_truncate_rows():
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(23, 4)
    g = input_grams(m, x, batch_size=4, max_examples=10)
    h = torch.tanh(m[0](x[:10])).detach()
    torch.testing.assert_close(g["0"], x[:10].T @ x[:10] / 10)
    torch.testing.assert_close(g["2"], h.T @ h / 10)
    s = input_grams(m, [(x[:6], None), (x[6:],)], max_examples=None, reduce="sum")  # batches, (x, y) pairs
    torch.testing.assert_close(s["0"], x.T @ x, rtol=1e-5, atol=1e-5)
    seq = input_grams(nn.Linear(4, 2), torch.randn(3, 5, 4), max_examples=None)  # tokens count as rows
    assert seq[""].shape == (4, 4)


def test_alpha_identities():
    a, b = _linear(0), _linear(1)
    x = torch.randn(40, 4)
    # α = 0 with equal Grams: the plain average, whatever the Gram
    grams = [input_grams(a, x), input_grams(b, x)]
    got = regmean_merge([a.state_dict(), b.state_dict()], grams, alpha=0.0).state_dict
    torch.testing.assert_close(got["weight"], (a.weight + b.weight).detach() / 2)
    # α = 0: each input column weighted by its diagonal energy, independently
    xb = torch.randn(40, 4) * torch.tensor([1.0, 3.0, 0.5, 2.0])
    grams = [input_grams(a, x), input_grams(b, xb)]
    got = regmean_merge([a.state_dict(), b.state_dict()], grams, alpha=0.0).state_dict["weight"]
    da, db = torch.diag(grams[0][""]), torch.diag(grams[1][""])
    torch.testing.assert_close(got, (a.weight.detach() * da + b.weight.detach() * db) / (da + db))
    # α = 1, identical models: the model itself, for any Grams
    got = regmean_merge([a.state_dict(), a.state_dict()], grams, alpha=1.0).state_dict
    torch.testing.assert_close(got["weight"], a.weight.detach(), rtol=1e-5, atol=1e-5)


def test_inputs_no_data_reached_are_averaged_not_divided_by_zero():
    a, b = _linear(0), _linear(1)
    x = torch.randn(20, 4)
    x[:, 2] = 0  # feature 2 never active in either model's data
    got = regmean_merge([a.state_dict(), b.state_dict()], [input_grams(a, x), input_grams(b, x)], alpha=1.0).state_dict
    assert torch.isfinite(got["weight"]).all()
    torch.testing.assert_close(got["weight"][:, 2], (a.weight[:, 2] + b.weight[:, 2]).detach() / 2)
    with pytest.raises(AttarError, match="one set per model"):
        regmean_merge([a.state_dict(), b.state_dict()], [input_grams(a, x)])


def test_regmean_plusplus_takes_grams_on_the_merged_prefix():
    """Two linear layers: the first is plain RegMean; the second's Grams come from the *merged* first layer."""
    torch.manual_seed(0)
    ms = [nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)) for _ in range(2)]
    xs = [torch.randn(24, 3), torch.randn(24, 3) + 1]
    got = regmean_plusplus_merge(ms, xs, alpha=0.9, examples=24, batch_size=8)
    plain = regmean_merge([m.state_dict() for m in ms], [input_grams(m, x) for m, x in zip(ms, xs)], alpha=0.9)
    torch.testing.assert_close(got.state_dict["0.weight"], plain.state_dict["0.weight"])
    first = nn.Linear(3, 5)
    first.load_state_dict({"weight": got.state_dict["0.weight"], "bias": got.state_dict["0.bias"]})
    hs = [torch.relu(first(x)).detach() for x in xs]
    by_hand = regmean_merge([{"w.weight": m[2].weight.detach()} for m in ms],
                            [{"w": h.T @ h / len(h)} for h in hs], alpha=0.9).state_dict["w.weight"]
    torch.testing.assert_close(got.state_dict["2.weight"], by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.state_dict["2.weight"], plain.state_dict["2.weight"])
    assert list(got.info["blocks"]) == ["0", "2"]
    with pytest.raises(AttarError, match="no linear layer lies under 'nope'"):
        regmean_plusplus_merge(ms, xs, blocks=["nope"])


def test_adamerging_lowers_entropy_and_records_lambdas():
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    fts = []
    for i in range(2):
        m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        m.load_state_dict({k: v + 0.5 * torch.randn_like(v) for k, v in pre.state_dict().items()})
        fts.append(m)
    before = {k: v.clone() for k, v in pre.state_dict().items()}
    xs = [torch.randn(64, 4), torch.randn(64, 4) + 1]
    for mode, shape in (("layer", (2, 4)), ("task", (2,))):
        res = adamerging_merge(pre, pre.state_dict(), [m.state_dict() for m in fts], xs, mode=mode, steps=30, lr=0.05)
        lam = torch.tensor(res.info["lambdas"])
        assert lam.shape == shape and not torch.allclose(lam, torch.full(shape, 0.3))
        assert res.info["entropy"][-1] < res.info["entropy"][0] - 1e-3, res.info["entropy"]
        # the result is task arithmetic at the learned coefficients
        c = lam if mode == "layer" else lam[:, None].expand(2, 4)
        for j, name in enumerate(res.info["parameters"]):
            want = pre.state_dict()[name] + sum(c[i, j] * (fts[i].state_dict()[name] - pre.state_dict()[name]) for i in range(2))
            torch.testing.assert_close(res.state_dict[name], want, rtol=1e-5, atol=1e-6)
    for k, v in pre.state_dict().items():  # functional: the template's weights never changed
        assert torch.equal(v, before[k])


@pytest.mark.skipif(not (GOLDEN / "expected.safetensors").exists(), reason="fixture not built")
def test_agrees_with_fusionbench():
    """FusionBench 0.2.33's RegMean (3 values of α), RegMean++ and AdaMerging (layer- and task-wise) on tiny models,
    stored by bench/merge_vs_fusionbench.py: attar's merged tensors, coefficients and losses within 1e-5."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mvf", Path(__file__).parents[1] / "bench" / "merge_vs_fusionbench.py")
    mvf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mvf)
    expected = load_file(GOLDEN / "expected.safetensors")
    diffs = mvf.compare(expected, mvf.run_attar(load_file(GOLDEN / "inputs.safetensors")))
    assert set(diffs) >= {"regmean.0.95", "regmean.1.0", "regmean.0.0", "regmean_plusplus.layers",
                          "adamerging.layer", "adamerging.task"}
    assert max(diffs.values()) <= 1e-5, diffs


def test_merge_stage_runs_data_aware_methods_and_reports_forgetting(tmp_path):
    from attar.pipeline import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
name: data-aware
data: {name: digits}
stages:
  - {name: pre, kind: train, model: {arch: mlp, hidden: [16]}, train: {epochs: 1, batch_size: 64}}
  - {name: ft_a, kind: train, init: pre, train: {epochs: 1, batch_size: 64}}
  - {name: ft_b, kind: train, init: pre, seed: 1, data: {name: digits, train_limit: 400, seed: 1}, train: {epochs: 1, batch_size: 32}}
  - name: rm
    kind: merge
    merge: {method: regmean, models: [ft_a, ft_b], parameters: {examples: 64, alpha: 0.9}}
  - name: rmpp
    kind: merge
    merge: {method: regmean_plusplus, models: [ft_a, ft_b], parameters: {examples: 64}}
  - name: ada
    kind: merge
    merge: {method: adamerging, base: pre, models: [ft_a, ft_b], parameters: {steps: 3, mode: task}}
""")
    run = run_recipe(recipe, home=tmp_path / "home")
    report = (run / "report.md").read_text()
    for col in ("accuracy on ft_a", "forgetting on ft_b", "forgetting (mean)", "lambda"):
        assert col in report, report
    assert " pp |" in report and "ft_a=0." in report
