"""Decoupled condensation (``sre2l``, ``cda``, ``cvdd``) and ``ncfm``: the BN-statistic loss, the crop curriculum,
committee soft labels, the characteristic-function min-max game, and artifacts that ``condense evaluate`` reads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attar.condense import condense, evaluate_condensed, load_synthetic
from attar.condense.bn_matching import BNStatHooks, crop_min_scale, vote_weights
from attar.data.transforms import random_resized_crop
from attar.condense.ncfm import SampleNet, calibration_loss, minmax_step, ncf_discrepancy
from attar.errors import AttarError
from attar.models import build_model, load_model, save_model
from attar.specs import ModelSpec
from attar.train.trainer import predict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelSpec(arch="convnet", width=8, depth=2)
QUICK = {"teacher_epochs": 8}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("home")
        mp.setenv("ATTAR_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def sre2l_set(home):
    # no crop/flip/jitter and a large BN weight: the objective is fixed, so the BN-statistic loss must fall
    params = QUICK | {"r_bn": 1.0, "crop_min": 1.0, "flip": False, "jitter": 0, "lr": 0.1}
    return condense("digits", "sre2l", 2, home / "sre2l", iterations=25, model=TINY, progress=False, params=params)


def test_bn_statistic_loss_is_zero_at_the_running_statistics_and_the_norm_of_the_gap_otherwise():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5, 5) * 2 + 1
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():  # hand-built: each layer's running stats = the batch stats of its input
        net[0].running_mean.copy_(x.mean((0, 2, 3)))
        net[0].running_var.copy_(x.var((0, 2, 3), unbiased=False))
        h = net[1](net[0](x))
        net[2].running_mean.copy_(h.mean((0, 2, 3)))
        net[2].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    hooks = BNStatHooks(net, first_multiplier=10.0)
    with torch.no_grad():
        net(x)
    assert float(hooks.loss()) < 1e-5
    delta = torch.tensor([0.3, -0.4, 0.0])  # ‖δ‖ = 0.5 on the first layer's mean, weighted ×10
    with torch.no_grad():
        net[0].running_mean.sub_(delta)
        net[2].running_var.add_(torch.tensor([0.0, 1.2, 0.0, 0.5]))  # ‖·‖ = 1.3 on the second layer's variance
        net(x)
    # the first layer's normalised output moved, so the second layer's batch stats moved too: recompute its term
    with torch.no_grad():
        h = net[1](net[0](x))
        second = torch.linalg.vector_norm(h.mean((0, 2, 3)) - net[2].running_mean) + \
            torch.linalg.vector_norm(h.var((0, 2, 3), unbiased=False) - net[2].running_var)
    assert float(hooks.loss()) == pytest.approx(10 * 0.5 + float(second), rel=1e-5)
    hooks.remove()


def test_sre2l_bn_loss_falls_and_soft_labels_are_the_teachers(sre2l_set):
    s = load_synthetic(sre2l_set)
    info = s.meta["sre2l"]
    assert s.x.shape == (20, 1, 8, 8) and s.y.tolist() == [c for c in range(10) for _ in range(2)]
    assert 0 <= float(s.x.min()) and float(s.x.max()) <= 1  # pixels clipped to the valid range
    assert info["bn_last"] < 0.8 * info["bn_first"], info
    teacher = load_model(s.meta["soft_label_teacher"])[0]
    assert s.meta["soft_label_teacher"] == info["teacher"] and info["trained_teacher"]
    assert torch.allclose(s.soft, predict(teacher, s.x).float(), atol=1e-5)
    assert s.meta["init"] == "noise"


def test_cda_crop_curriculum_follows_the_formula():
    lo = 0.08
    assert crop_min_scale(0, 100, "cosine") == pytest.approx(1.0)
    assert crop_min_scale(50, 100, "cosine") == pytest.approx(lo + (1 - lo) / 2)
    assert crop_min_scale(100, 100, "cosine") == pytest.approx(lo)
    assert crop_min_scale(25, 100, "cosine") == pytest.approx(lo + (1 - lo) * (1 + math.cos(math.pi / 4)) / 2)
    assert crop_min_scale(25, 100, "linear") == pytest.approx(lo + (1 - lo) * 0.75)
    assert crop_min_scale(25, 100, "cosine", milestone=0.5) == pytest.approx(lo + (1 - lo) / 2)  # middle of M = 50
    assert crop_min_scale(60, 100, "cosine", milestone=0.5) == lo  # after the milestone: local crops
    assert crop_min_scale(40, 100, "step", milestone=0.5) == 1.0 and crop_min_scale(0, 100, "constant") == lo


def test_cda_run_records_the_schedule(home):
    out = condense("digits", "cda", 1, home / "cda", iterations=6, model=TINY, progress=False,
                   params=QUICK | {"curriculum": "linear"})
    info = load_synthetic(out).meta["cda"]
    assert info["min_scale_first"] == 1.0
    assert info["min_scale_last"] == pytest.approx(crop_min_scale(5, 6, "linear"), abs=1e-4)


def test_random_resized_crop_of_the_whole_image_is_the_image():
    x = torch.rand(4, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(random_resized_crop(x, (1.0, 1.0), g, flip=False, ratio=(1.0, 1.0)), x, atol=1e-5)
    flipped = random_resized_crop(x, (1.0, 1.0), torch.Generator().manual_seed(1), flip=True, ratio=(1.0, 1.0))
    assert all(torch.allclose(f, i, atol=1e-5) or torch.allclose(f, i.flip(-1), atol=1e-5) for f, i in zip(flipped, x))


def test_cvdd_soft_labels_are_the_committee_mean_and_the_control_uses_the_committee(home):
    out = condense("digits", "cvdd", 1, home / "cvdd", iterations=3, model=TINY, progress=False,
                   params=QUICK | {"voter": "equal", "committee": 2})
    s = load_synthetic(out)
    paths = s.meta["cvdd"]["teachers"]
    assert len(paths) == 2 and paths[0] != paths[1] and s.meta["cvdd"]["weights"] == [0.5, 0.5]
    probs = torch.stack([F.softmax(predict(load_model(p)[0], s.x).float(), -1) for p in paths]).mean(0)
    assert torch.allclose(F.softmax(s.soft, -1), probs, atol=1e-5)
    r = evaluate_condensed(out, nets=1, epochs=2, full_data=False, test_limit=50, cache_dir=home / "eval")
    assert "condensed_soft" in r and r["random_subset_soft"]["teacher"].startswith("committee")


def test_cvdd_prior_vote_is_a_softmax_of_accuracies():
    w = vote_weights([90.0, 80.0], "prior", 5.0)
    assert w[0] == pytest.approx(math.exp(2) / (1 + math.exp(2)))
    assert vote_weights([90.0, 80.0, 70.0], "equal", 5.0) == pytest.approx([1 / 3] * 3)


def test_ncf_discrepancy_zero_for_identical_features_positive_otherwise():
    torch.manual_seed(0)
    f = F.normalize(torch.randn(3, 20, 6), dim=-1)
    t = torch.randn(64, 6)
    assert float(ncf_discrepancy(f, f.clone(), t)) == 0.0
    assert float(ncf_discrepancy(f, f[:, :10], t)) > 0.01
    assert float(ncf_discrepancy(f, F.normalize(f + 0.3, dim=-1), t)) > 0.01
    # alpha = beta: the discrepancy is sqrt(alpha) * |phi_real - phi_syn|, averaged over t, summed over classes
    g = F.normalize(torch.randn(3, 7, 6), dim=-1)
    pr, ps = (torch.exp(1j * torch.einsum("kd,cnd->ckn", t, a)).mean(-1) for a in (f, g))
    assert float(ncf_discrepancy(f, g, t)) == pytest.approx(float((0.5 ** 0.5 * (pr - ps).abs()).mean(-1).sum()), rel=1e-4)


def test_ncfm_minmax_step_sampler_ascends_images_descend():
    torch.manual_seed(0)
    w = torch.randn(12, 6)
    real = F.normalize(torch.randn(2, 30, 12) @ w, dim=-1)
    z = torch.randn(2, 5, 12, requires_grad=True)
    sampler = SampleNet(6)
    noise = torch.randn(128, 6)

    def disc(images, s):
        return ncf_discrepancy(real, F.normalize(images @ w, dim=-1), s(noise))

    z0, s0 = z.detach().clone(), copy.deepcopy(sampler)
    d0 = float(disc(z0, s0))
    minmax_step(300 * disc(z, sampler), z, sampler, torch.optim.SGD([z], lr=1e-4), torch.optim.SGD(sampler.parameters(), lr=1e-4))
    with torch.no_grad():
        assert float(disc(z.detach(), s0)) < d0  # the image step alone lowers it
        assert float(disc(z0, sampler)) > d0  # the sampler step alone raises it


def test_ncfm_calibration_loss_is_each_classes_mean_cross_entropy_summed():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    want = sum(float(F.cross_entropy(net(x[y == c]), y[y == c])) for c in range(3))
    assert float(calibration_loss(net, x, y, 3)) == pytest.approx(want, rel=1e-6)


def test_ncfm_calibration_makes_the_images_easier_for_the_trained_network(home, sre2l_set, tmp_path):
    """The same run with and without calibration steps: the calibrating network (here a trained teacher) finds the
    calibrated images easier (lower cross-entropy on their own labels). Without a trained network it is refused."""
    from attar.models import load_model
    from attar.train.trainer import predict

    teacher = load_synthetic(sre2l_set).meta["soft_label_teacher"]
    base = {"feature_nets": 1, "feature_epochs": 1, "num_freqs": 64, "batch_real": 8, "dsa": False, "lr_img": 0.1}
    sets = {k: load_synthetic(condense("digits", "ncfm", 2, tmp_path / f"c{k}", iterations=5, model=TINY, progress=False,
                                       params=base | {"calib_iters": k, "calib_model": teacher, "calib_weight": 10.0}))
            for k in (0, 3)}
    assert "calibration_loss_last" in sets[3].meta["ncfm"] and "calibration_loss_last" not in sets[0].meta["ncfm"]
    net = load_model(teacher)[0]
    loss = {k: float(F.cross_entropy(predict(net, s.x).float(), s.y)) for k, s in sets.items()}
    assert loss[3] < loss[0] - 0.3, loss
    with pytest.raises(AttarError, match="calib_iters needs a trained network"):
        condense("digits", "ncfm", 1, tmp_path / "x", iterations=1, model=TINY, progress=False,
                 params=base | {"feature_epochs": 0, "calib_iters": 1})


def test_every_new_method_writes_an_artifact_evaluate_reads_within_a_budget(home, sre2l_set):
    r = evaluate_condensed(sre2l_set, nets=1, epochs=2, full_data=False, test_limit=50, cache_dir=home / "eval")
    teacher = load_synthetic(sre2l_set).meta["soft_label_teacher"]
    assert "condensed_soft" in r and r["random_subset_soft"]["teacher"] == teacher
    out = condense("digits", "ncfm", 1, home / "ncfm", iterations=4, model=TINY, progress=False,
                   params={"feature_nets": 2, "feature_epochs": 1, "num_freqs": 64, "batch_real": 8})
    s = load_synthetic(out)
    assert s.soft is None and s.meta["ncfm"]["feature_nets"] == 2 and s.meta["iterations"] == 4
    assert "condensed" in evaluate_condensed(out, nets=1, epochs=2, full_data=False, test_limit=50, cache_dir=home / "eval")
    # far more iterations than 1.5 s allows on any machine, so the budget is what stops it (a fast machine ran the
    # default 1,000 within 1.5 s)
    b = condense("digits", "sre2l", 1, home / "budget", budget=1.5, iterations=10**7, model=TINY, progress=False,
                 params=QUICK)
    m = load_synthetic(b).meta
    assert m["stopped_by_budget"] and 1 <= m["iterations"] < 10**7


def test_refusals_name_the_fix(home, tmp_path):
    b = build_model(TINY, (1, 8, 8), 10)  # instance norm: no BatchNorm statistics to match
    save_model(tmp_path / "in", b)
    with pytest.raises(AttarError, match="no BatchNorm"):
        condense("digits", "sre2l", 1, tmp_path / "a", iterations=1, model=TINY, progress=False, params={"teacher": str(tmp_path / "in")})
    with pytest.raises(AttarError, match="teachers"):
        condense("digits", "cvdd", 1, tmp_path / "b", iterations=1, model=TINY, progress=False, params={"teacher": "x"})
    with pytest.raises(AttarError, match="relabels its images with its own teacher"):
        condense("digits", "sre2l", 1, tmp_path / "d", iterations=1, model=TINY, progress=False, soft_labels=tmp_path / "in")
    with pytest.raises(AttarError, match="drop flip"):
        condense("digits", "cda", 1, tmp_path / "c", iterations=1, model=TINY, progress=False, flip=True, params=QUICK)
