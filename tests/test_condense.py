"""attar.condense: losses, augmentation, selection, artifacts and errors (all small and fast)."""

from __future__ import annotations

import json

import pytest
import torch

from attar.condense import (CONDENSERS, DSA, SyntheticSet, check_request, condense, evaluate_condensed, load_synthetic,
                            render_grid, save_synthetic)
from attar.condense.base import ClassIndex
from attar.condense.dc import match_distance, per_class_grads
from attar.condense.dm import dm_loss, siamese
from attar.condense.selection import herding_select, kcenter_select
from attar.data import load_data
from attar.errors import AttarError
from attar.models import build_model
from attar.specs import DataSpec, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelSpec(arch="convnet", width=8, depth=2)


def _net(classes=3, shape=(1, 12, 12), dtype=torch.float32):
    torch.manual_seed(0)
    return build_model(TINY, shape, classes, [0.5], [0.25]).to(dtype)


# ------------------------------------------------------------------ DM


def test_dm_loss_zero_when_synthetic_matches_real_class_means():
    torch.manual_seed(0)
    c, b = 3, 5
    real = torch.rand(c * b, 1, 6, 6)
    means = real.view(c, b, 1, 6, 6).mean(1)  # one synthetic image per class = the class mean
    identity = lambda x: x.flatten(1)  # noqa: E731
    assert float(dm_loss(identity, real, means, c)) == pytest.approx(0.0, abs=1e-10)
    # Under any network, a synthetic set equal to the real rows has zero loss; a perturbed one does not.
    net = _net(c, (1, 6, 6))
    assert float(dm_loss(net.embed, real, real.clone(), c).detach()) == pytest.approx(0.0, abs=1e-8)
    assert float(dm_loss(identity, real, means + 0.1, c)) > 0
    # Classes are matched separately: swapping two classes' synthetic rows is penalised.
    swapped = means[[1, 0, 2]]
    assert float(dm_loss(identity, real, swapped, c)) > 0


def test_dm_loss_gradient_reaches_only_synthetic_images():
    c = 2
    real = torch.rand(4, 1, 6, 6, requires_grad=True)
    syn = torch.rand(2, 1, 6, 6, requires_grad=True)
    dm_loss(_net(c, (1, 6, 6)).embed, real, syn, c).backward()
    assert real.grad is None and syn.grad is not None and float(syn.grad.abs().sum()) > 0


# ------------------------------------------------------------------ DSA


@pytest.mark.parametrize("op", ["color", "crop", "cutout", "flip", "scale", "rotate"])
def test_dsa_same_params_same_transform_and_differentiable(op):
    torch.manual_seed(1)
    dsa = DSA(op, mean=0.3, std=0.4)
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64)
    p = dsa.sample(1, torch.Generator().manual_seed(0), x.shape[1:])
    a, b = dsa.apply(x, p), dsa.apply(x.clone(), p)
    assert torch.equal(a, b)
    # One draw for the whole batch: every row gets the same transform.
    assert torch.allclose(dsa.apply(x[2:3], p), a[2:3])
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, p), (xg[:1].detach().requires_grad_(True),), eps=1e-6, atol=1e-5)
    dsa.apply(xg, p).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_dsa_siamese_per_class_identical_on_real_and_synthetic():
    c, b, ipc = 3, 4, 2
    real = torch.rand(c * b, 1, 12, 12)
    syn = real.view(c, b, 1, 12, 12)[:, :ipc].reshape(c * ipc, 1, 12, 12).clone()
    dsa = DSA(mode="all", mean=0.5, std=0.3)
    xr, xs = siamese(dsa, real, syn, c, torch.Generator().manual_seed(3))
    assert torch.allclose(xr.view(c, b, 1, 12, 12)[:, :ipc].reshape(c * ipc, 1, 12, 12), xs, atol=1e-6)
    # ...and different classes got different transforms.
    assert not torch.allclose(dsa.apply(real[:1], dsa.sample(c, torch.Generator().manual_seed(3), real.shape[1:]),
                                        torch.tensor([0])),
                              dsa.apply(real[:1], dsa.sample(c, torch.Generator().manual_seed(3), real.shape[1:]),
                                        torch.tensor([1])))


def test_dsa_crop_and_flip_are_exact():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    dsa = DSA("crop_flip", mode="all")
    from attar.condense.augment import DSAParams

    p = DSAParams(("crop",), {"shift_x": torch.tensor([1.0]), "shift_y": torch.tensor([0.0])})
    out = dsa.apply(x, p)
    want = torch.cat([x[..., 1:], torch.zeros(1, 1, 5, 1)], dim=3)  # output(j) = input(j + 1), zeros shifted in
    assert torch.allclose(out, want, atol=1e-5)
    p = DSAParams(("flip",), {"flip": torch.tensor([1.0])})
    assert torch.equal(dsa.apply(x, p), x.flip(3))


def test_dsa_as_trainer_augment_is_deterministic_per_generator():
    dsa = DSA(mean=0.5, std=0.3)
    x = torch.rand(6, 1, 12, 12)
    a = dsa(x, torch.Generator().manual_seed(5))
    b = dsa(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape


# ------------------------------------------------------------------ selection


def test_herding_picks_sample_closest_to_mean_first():
    feats = torch.tensor([[[0.0], [10.0], [4.5], [7.0]]])  # mean 5.375
    valid = torch.ones(1, 4, dtype=torch.bool)
    pos = herding_select(feats, valid, 2)
    assert pos[0, 0] == 2
    # Second pick brings the running mean closest to 5.375: (4.5 + 7) / 2 = 5.75 beats 2.25 and 7.25.
    assert pos[0, 1] == 3


def test_kcenter_picks_farthest_point():
    feats = torch.tensor([[[0.0], [1.0], [2.0], [10.0]], [[5.0], [5.0], [0.0], [0.0]]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])  # class 1 has 3 rows
    pos = kcenter_select(feats, valid, 3)
    assert pos[0].tolist() == [2, 3, 0]  # closest to mean 3.25, then farthest (10), then 0
    assert pos[1, 0] in (0, 1) and pos[1, 1] == 2 and 3 not in pos[1].tolist()


def test_class_index_draws_distinct_rows_per_class():
    y = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, -1])
    idx = ClassIndex(y, 3)
    rows = idx.draw(3, torch.Generator().manual_seed(0))
    assert rows.shape == (3, 3)
    for c in range(3):
        assert (y[rows[c]] == c).all() and len(set(rows[c].tolist())) == 3


# ------------------------------------------------------------------ gradient matching


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_per_class_gradients_match_a_loop_and_reach_the_images(batching):
    torch.set_default_dtype(torch.float64)
    try:
        net = _net(3, dtype=torch.float64)
        params = {k: v.detach() for k, v in net.named_parameters()}
        y = torch.arange(3).repeat_interleave(2)
        x = torch.rand(6, 1, 12, 12, requires_grad=True)
        xr = torch.rand(6, 1, 12, 12)
        gs = per_class_grads(net, params, x, y, 3, batching)
        gr = per_class_grads(net, params, xr, y, 3, batching)
        gr = {k: v.detach() for k, v in gr.items()}
        loss = match_distance(gr, gs)
        loss.backward()
        ps = list(net.parameters())
        x2 = x.detach().clone().requires_grad_(True)
        ref = 0.0
        for c in range(3):
            s = slice(2 * c, 2 * c + 2)
            a = torch.autograd.grad(torch.nn.functional.cross_entropy(net(xr[s]), y[s]), ps)
            b = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x2[s]), y[s]), ps, create_graph=True)
            for ga, gb in zip(a, b):
                if ga.dim() > 1:
                    a2, b2 = ga.flatten(1), gb.flatten(1)
                    ref = ref + (1 - (a2 * b2).sum(-1) / (a2.norm(dim=-1) * b2.norm(dim=-1) + 1e-6)).sum()
        ref.backward()
        assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
        assert torch.allclose(x.grad, x2.grad, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------ artifacts


def test_artifact_round_trip_and_tamper_detection(tmp_path):
    s = SyntheticSet(torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2]), {"method": "dm", "ipc": 2, "seed": 7},
                     soft=torch.randn(6, 3))
    path = save_synthetic(tmp_path / "a", s)
    t = load_synthetic(path)
    assert torch.equal(t.x, s.x) and torch.equal(t.y, s.y) and torch.equal(t.soft, s.soft)
    assert t.meta == {"method": "dm", "ipc": 2, "seed": 7}
    assert json.loads((path / "state.json").read_text())["kind"] == "condensed"
    with pytest.raises(AttarError, match="not empty"):
        save_synthetic(tmp_path / "a", s)
    blob = bytearray((path / "synthetic.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "synthetic.safetensors").write_bytes(bytes(blob))
    with pytest.raises(AttarError, match="does not match its manifest"):
        load_synthetic(path)


def test_condense_digits_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    out = condense("digits", "dm", 2, tmp_path / "dm", iterations=3, seed=1, model=TINY, params={"batch_real": 8})
    s = load_synthetic(out)
    assert s.x.shape == (20, 1, 8, 8) and s.y.tolist() == [c for c in range(10) for _ in range(2)]
    assert s.meta["method"] == "dm" and s.meta["ipc"] == 2 and s.meta["seed"] == 1 and len(s.meta["data_hash"]) == 64
    assert s.meta["model"]["arch"] == "convnet" and s.meta["data_spec"]["name"] == "digits"
    # Same call, same images (seeded).
    again = load_synthetic(condense("digits", "dm", 2, tmp_path / "dm2", iterations=3, seed=1, model=TINY,
                                    params={"batch_real": 8}))
    assert torch.equal(s.x, again.x)
    # Any later stage reads it as DataSpec(artifact=...): synthetic train, the source's val/test.
    b, src = load_data(DataSpec(artifact=str(out))), load_data(DataSpec(name="digits"))
    assert torch.equal(b.train.x, s.x) and torch.equal(b.test.x, src.test.x) and torch.equal(b.mean, src.mean)
    r = evaluate_condensed(out, nets=2, model=TINY, epochs=2, full_epochs=1, cache_dir=tmp_path / "cache")
    assert set(r) >= {"condensed", "random_subset", "full_data"} and r["condensed"]["n"] == 2
    assert 0.0 <= r["condensed"]["mean"] <= 1.0 and (out / "evaluation.json").exists()
    r2 = evaluate_condensed(out, nets=1, model=TINY, epochs=2, full_epochs=1, cache_dir=tmp_path / "cache", compare_random=False)
    assert "cached" in r2["full_data"] and "random_subset" not in r2
    png = render_grid(out, tmp_path / "grid.png")
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("method", ["random", "herding", "kcenter", "datadam", "dc", "dsa"])
def test_every_method_runs_on_digits(tmp_path, method):
    params = {"dc": {"batch_real": 4, "inner_loop": 1, "outer_loop": 2}, "dsa": {"batch_real": 4, "inner_loop": 1, "outer_loop": 2},
              "datadam": {"batch_real": 8}, "herding": {"pool": 50}, "kcenter": {"pool": 50}}.get(method, {})
    out = condense("digits", method, 2, tmp_path / method, iterations=1, model=TINY, params=params, progress=False,
                   init="noise" if method == "dsa" else "real")
    s = load_synthetic(out)
    assert s.x.shape == (20, 1, 8, 8) and torch.isfinite(s.x).all()
    if method in ("random", "herding", "kcenter"):
        src = load_data(DataSpec(name="digits")).train
        rows = torch.tensor(s.meta["selected_rows"])
        assert torch.equal(src.x[rows], s.x) and torch.equal(src.y[rows], s.y)


def test_soft_labels_are_stored_and_evaluated_separately(tmp_path):
    from attar.models import save_model

    b = load_data(DataSpec(name="digits"))
    torch.manual_seed(0)
    teacher = build_model(TINY, b.input_shape, 10, b.mean, b.std)
    save_model(tmp_path / "teacher", teacher)
    out = condense("digits", "random", 1, tmp_path / "r", model=TINY, soft_labels=tmp_path / "teacher", progress=False)
    s = load_synthetic(out)
    assert s.soft is not None and s.soft.shape == (10, 10)
    r = evaluate_condensed(out, nets=1, model=TINY, epochs=1, compare_random=False, full_data=False)
    assert "condensed_soft" in r and "condensed" in r


# ------------------------------------------------------------------ errors before work


def test_unknown_method_lists_known(tmp_path):
    with pytest.raises(AttarError, match=r"Unknown condensation method 'nope'.*dc, dm, dsa, herding, kcenter, mtt, ncfm, random, rded, sre2l"):
        condense("digits", "nope", 1, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_ipc_larger_than_smallest_class(tmp_path):
    with pytest.raises(AttarError, match=r"ipc=500 is larger than the smallest class.*use ipc <= \d+"):
        condense("digits", "random", 500, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_single_class_and_bad_fields():
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(AttarError, match="needs at least two"):
        check_request("dm", 1, y, ["only"], "one-class")
    with pytest.raises(AttarError, match=r"condensation method 'dm': unknown field 'lr_imgg'.*Accepted fields: lr_img"):
        CONDENSERS.get("dm")({"lr_imgg": 1})
    with pytest.raises(AttarError, match="positive integer"):
        check_request("dm", 0, torch.tensor([0, 1]), ["a", "b"], "t")
    with pytest.raises(AttarError, match="init must be"):
        check_request("dm", 1, torch.tensor([0, 1]), ["a", "b"], "t", init="zeros")


def test_not_a_condensed_artifact(tmp_path):
    from attar.models import save_model

    save_model(tmp_path / "m", _net())
    with pytest.raises(AttarError, match="not a condensed data set"):
        load_synthetic(tmp_path / "m")
    with pytest.raises(AttarError, match="does not exist"):
        load_synthetic(tmp_path / "nope")


def test_cli_condense_and_evaluate(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attar.cli.condense import app

    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("ATTAR_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(app, ["--data", "digits", "--method", "random", "--ipc", "1", "--out", str(tmp_path / "c"),
                                 "--width", "8", "--depth", "2", "--png", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "g.png").exists()
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "c"), "--nets", "1", "--epochs", "1", "--no-full"])
    assert r.exit_code == 0, r.output
    assert "random real subset" in r.output
    r = CliRunner().invoke(app, ["--data", "digits", "--method", "nope", "--ipc", "1", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "Known condensation methods" in r.output
