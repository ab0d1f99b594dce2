"""arcee_fusion, ram and ramplus_tl (mergekit's methods): each against values worked out by hand or a formula
computed here in plain Python, independently of attar's method code; one `attar merge` run of each on the tiny
golden Llama models; clear errors for bad parameters and input counts. mergekit is not used."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from attar.errors import AttarError
from attar.merge import merge_state_dicts, run_merge

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend

GOLDEN = Path(__file__).parent / "golden" / "merge" / "models"


# ---------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_by_hand_uses_order_statistic_quartiles():
    # One row: its KL is one positive number k, so importance = k·|Δ| and the fence scales with k too.
    # |Δ| sorted = 0.1 0.2 0.3 0.4 0.62 0.9 (n = 6): Q1, Q2, Q3 are the 1st, 2nd, 3rd smallest (0-based,
    # ⌊q·5⌋) = 0.2, 0.3, 0.4, so the fence is 0.3 + 1.5·0.2 = 0.6: 0.62 and 0.9 are fused, the rest keep the base.
    # (Interpolated quartiles 0.225, 0.35, 0.565 would put the fence at 0.86 and fuse only 0.9.)
    base = torch.tensor([0.5, -0.2, 0.1, 0.3, 0.0, -0.4])
    delta = torch.tensor([0.62, -0.1, 0.3, -0.9, 0.2, -0.4])
    other = base + delta
    out = merge_state_dicts("arcee_fusion", [{"w": other}], base={"w": base})["w"]
    want = base.clone()
    want[[0, 3]] += delta[[0, 3]]
    assert torch.equal(out, want)


def _fusion_reference(base: list[list[float]], other: list[list[float]]) -> tuple[list[list[float]], float, list[float]]:
    """The method's definition in float64 plain Python: per-row softmax KL, |Δ|·KL, upper Tukey fence."""
    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) for v in e]

    scores = []
    for b, o in zip(base, other):
        p = [v + 1e-8 for v in softmax(o)]
        q = [v + 1e-8 for v in softmax(b)]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        scores.append([abs(x - y) * kl for x, y in zip(o, b)])
    flat = sorted(s for row in scores for s in row)
    n = len(flat) - 1
    fence = flat[n // 2] + 1.5 * (flat[3 * n // 4] - flat[n // 4])
    return [[o if s >= fence else b for b, o, s in zip(br, orow, sr)] for br, orow, sr in zip(base, other, scores)], fence, flat


def test_arcee_fusion_matrix_matches_the_definition_row_by_row():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 9, generator=g)
    other = base + 0.3 * torch.randn(6, 9, generator=g) * (torch.rand(6, 9, generator=g) < 0.5)
    out = merge_state_dicts("arcee_fusion", [{"w": other}], base={"w": base})["w"]
    want, fence, flat = _fusion_reference(base.tolist(), other.tolist())
    assert min(abs(s - fence) for s in flat) > 1e-5 * fence  # no entry so close to the fence that float32 could flip it
    fused = out != base
    assert 0 < int(fused.sum()) < int((other != base).sum())  # some changes fused, some not: the fence matters
    torch.testing.assert_close(out, torch.tensor(want), rtol=0, atol=1e-6)  # fused entries: base + (other − base)


def test_arcee_fusion_identities():
    base = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(merge_state_dicts("arcee_fusion", [{"w": base.clone()}], base={"w": base})["w"], base)
    # every output entry is the base's or the base plus the whole change, never a blend
    other = base + torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    out = merge_state_dicts("arcee_fusion", [{"w": other}], base={"w": base})["w"]
    assert bool(((out == base) | (out == base + (other - base))).all())


# ---------------------------------------------------------------- ram / ramplus_tl

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
# task vectors: entry 0 changed by both, 1 only by A, 2 and 3 only by B, 4 by A below epsilon (1e-6 < 1e-5)
TAU_A = torch.tensor([1.0, 2.0, 0.0, 0.0, 1e-6])
TAU_B = torch.tensor([3.0, 0.0, 4.0, 5.0, 0.0])


def _ram(method: str, **params) -> torch.Tensor:
    models = [{"w": BASE + TAU_A}, {"w": BASE + TAU_B}]
    return merge_state_dicts(method, models, base={"w": BASE}, parameters=params or None)["w"]


def test_ram_by_hand_unique_kept_shared_averaged_tiny_dropped():
    # entry 0: (1 + 3)/2 = 2; entry 1: 2 (A alone); entries 2, 3: 4, 5 (B alone); entry 4: below epsilon -> base
    torch.testing.assert_close(_ram("ram"), BASE + torch.tensor([2.0, 2.0, 4.0, 5.0, 0.0]), rtol=0, atol=0)
    # with epsilon 0 the 1e-6 change counts: A alone changed entry 4, so it is kept
    torch.testing.assert_close(_ram("ram", epsilon=0.0)[4], (BASE + TAU_A)[4], rtol=0, atol=0)
    # a larger epsilon drops A's change of 1 at entry 0, which is then B's alone
    torch.testing.assert_close(_ram("ram", epsilon=1.5), BASE + torch.tensor([3.0, 2.0, 4.0, 5.0, 0.0]), rtol=0, atol=0)


def test_ramplus_by_hand_boosts_unique_updates_by_shared_over_unique():
    # A: shared 1 (entry 0), unique 1 (entry 1) -> rho 1;  B: shared 1, unique 2 (entries 2, 3) -> rho 0.5
    # r = 0.5, alpha = 1: lambda_A = 1 + 0.5·1 = 1.5, lambda_B = 1 + 0.5·0.5 = 1.25; shared entries averaged, unboosted
    out = _ram("ramplus_tl", r=0.5, alpha=1.0)
    torch.testing.assert_close(out, BASE + torch.tensor([2.0, 2 * 1.5, 4 * 1.25, 5 * 1.25, 0.0]), rtol=0, atol=0)
    # defaults r = 0.1, alpha = 0.2 cap both rhos at 0.2: lambda = 1.02 for both
    out = _ram("ramplus_tl")
    torch.testing.assert_close(out, BASE + torch.tensor([2.0, 2 * 1.02, 4 * 1.02, 5 * 1.02, 0.0]), rtol=1e-7, atol=0)
    # r = 0 is RAM exactly
    assert torch.equal(_ram("ramplus_tl", r=0.0), _ram("ram"))


def test_ram_disjoint_updates_are_task_arithmetic_and_shapes_are_kept():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.5
    ta, tb = torch.randn(4, 6, generator=g) * mask, torch.randn(4, 6, generator=g) * ~mask  # no entry changed by both
    models = [{"w": base + ta}, {"w": base + tb}]
    out = merge_state_dicts("ram", models, base={"w": base})["w"]
    assert out.shape == (4, 6)
    want = merge_state_dicts("task_arithmetic", models, base={"w": base})["w"]  # base + τ_A + τ_B
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # one model: its own task vector, whole
    torch.testing.assert_close(merge_state_dicts("ram", models[:1], base={"w": base})["w"], base + ta, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("method,params,field", [
    ("ram", {"epsilon": -1.0}, "epsilon"),
    ("ramplus_tl", {"r": -0.1}, "r "),
    ("ramplus_tl", {"alpha": "high"}, "alpha"),
    ("ramplus_tl", {"epsilon": float("inf")}, "epsilon"),
    ("ram", {"r": 0.5}, "'r'"),  # RAM has no r
    ("arcee_fusion", {"t": 0.5}, "'t'"),  # arcee_fusion takes no parameters
])
def test_bad_parameters_are_refused_by_name(method, params, field):
    with pytest.raises(AttarError, match=field):
        merge_state_dicts(method, [{"w": torch.ones(3)}], base={"w": torch.zeros(3)}, parameters=params)


def test_arcee_fusion_needs_a_base_and_exactly_one_other_model(tmp_path):
    m = {"w": torch.ones(3)}
    with pytest.raises(AttarError, match="base"):
        merge_state_dicts("arcee_fusion", [m, m])
    with pytest.raises(AttarError, match="exactly one model"):
        merge_state_dicts("arcee_fusion", [m, m], base={"w": torch.zeros(3)})
    cfg = {"merge_method": "arcee_fusion", "base_model": str(GOLDEN / "base"),
           "models": [{"model": str(GOLDEN / n)} for n in ("ft_a", "ft_b")]}
    with pytest.raises(AttarError, match="exactly 1"):
        run_merge(cfg, tmp_path / "out", progress=False)


# ---------------------------------------------------------------- end to end: `attar merge` on the golden models


def test_attar_merge_cli_runs_all_three_on_the_golden_models(tmp_path):
    from attar.cli import app

    sd = {n: load_file(str(GOLDEN / n / "model.safetensors")) for n in ("base", "ft_a", "ft_b")}
    configs = {
        # mergekit's examples/arcee_fusion.yml shape: the base listed among the models too
        "fusion": {"merge_method": "arcee_fusion", "base_model": str(GOLDEN / "ft_a"), "dtype": "float32",
                   "models": [{"model": str(GOLDEN / "ft_a")}, {"model": str(GOLDEN / "ft_b")}]},
        "ram": {"merge_method": "ram", "base_model": str(GOLDEN / "base"), "dtype": "float32",
                "models": [{"model": str(GOLDEN / n), "parameters": {"weight": w}} for n, w in (("ft_a", 0.6), ("ft_b", 0.4))]},
        "ramplus": {"merge_method": "ramplus_tl", "base_model": str(GOLDEN / "base"), "dtype": "float32",
                    "parameters": {"r": 0.05, "alpha": 1.0},
                    "models": [{"model": str(GOLDEN / n)} for n in ("ft_a", "ft_b")]},
    }
    out = {}
    for name, cfg in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        res = CliRunner().invoke(app, ["merge", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)], env={"CI": "true"})
        assert res.exit_code == 0, res.output
        out[name] = load_file(str(tmp_path / name / "model.safetensors"))
        assert set(out[name]) == set(sd["base"])

    a, b, base = sd["ft_a"], sd["ft_b"], sd["base"]
    fused_any = kept_any = False
    for k in base:
        o = out["fusion"][k]
        took_b = o == a[k] + (b[k] - a[k])
        assert bool(((o == a[k]) | took_b).all())  # each entry ft_a's (the base here) or ft_a's plus ft_b's whole change
        fused_any |= bool((took_b & (o != a[k])).any())
        kept_any |= bool(((o == a[k]) & (b[k] != a[k])).any())
        # RAM: the golden fine-tunes change every entry, so every entry is shared: the plain mean of the two
        ta, tb = a[k] - base[k], b[k] - base[k]
        shared = (ta.abs() > 1e-5) & (tb.abs() > 1e-5)
        want = base[k] + torch.where(shared, (ta + tb) / 2, torch.where(ta.abs() > 1e-5, ta, 0) + torch.where(tb.abs() > 1e-5, tb, 0))
        torch.testing.assert_close(out["ram"][k], want, rtol=1e-6, atol=1e-6)
        assert torch.equal(out["ramplus"][k], out["ram"][k]) == bool(shared.all())  # no unique entries: nothing to boost
    assert fused_any and kept_any
