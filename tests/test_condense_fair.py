"""Fair condensation evaluation: the full-data reference's budget and plateau, DD-Ranking's equal-label control and
its label- and augmentation-robust scores."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import attar.condense.evaluate as E
from attar.condense import condense, evaluate_condensed, format_evaluation, load_synthetic
from attar.condense.base import ClassIndex
from attar.condense.ranking import augmentation_robust_score, label_robust_score, normalise
from attar.data import load_data
from attar.errors import AttarError
from attar.models import build_model, load_model, save_model
from attar.specs import DataSpec, ModelSpec
from attar.train.trainer import predict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelSpec(arch="convnet", width=8, depth=2)


# ------------------------------------------------------------------ DD-Ranking's scores, by hand


def test_label_robust_score_matches_hand_computed_values():
    r = label_robust_score(real_hard=0.9, syn_hard=0.6, syn_any=0.7, random_any=0.65)
    assert r["hlr"] == pytest.approx(0.3) and r["ior"] == pytest.approx(0.05)
    assert r["alpha"] == pytest.approx(0.5 * 0.05 - 0.5 * 0.3)  # -0.125
    # 100 (e^-0.125 - e^-1) / (e - e^-1) = 100 (0.882497 - 0.367879) / 2.350402
    assert r["lrs"] == pytest.approx(21.895, abs=1e-3)
    # w = 1: only the gain over random counts
    assert label_robust_score(0.9, 0.6, 0.7, 0.65, w=1.0)["alpha"] == pytest.approx(0.05)
    # the map's ends and its value at 0
    assert normalise(1.0) == pytest.approx(100.0) and normalise(-1.0) == pytest.approx(0.0)
    assert normalise(0.0) == pytest.approx(100 * (1 - math.exp(-1)) / (math.e - math.exp(-1)))  # 26.89
    assert normalise(0.0) == pytest.approx(26.894, abs=1e-3)


def test_augmentation_robust_score_matches_hand_computed_values():
    r = augmentation_robust_score(syn_aug=0.8, random_aug=0.7, syn_no_aug=0.6, random_no_aug=0.4)
    assert r["gain_aug"] == pytest.approx(0.1) and r["gain_no_aug"] == pytest.approx(0.2)
    assert r["beta"] == pytest.approx(0.15)
    assert r["ars"] == pytest.approx(33.780, abs=1e-3)  # 100 (e^0.15 - e^-1) / (e - e^-1)
    assert augmentation_robust_score(0.8, 0.7, 0.6, 0.4, gamma=0.0)["beta"] == pytest.approx(0.2)


def test_scores_refuse_percentages_and_bad_weights():
    with pytest.raises(AttarError, match=r"syn_hard must be an accuracy in \[0, 1\] \(a fraction, not a percentage\)"):
        label_robust_score(0.9, 97.8, 0.7, 0.6)
    with pytest.raises(AttarError, match=r"w must be in \[0, 1\]"):
        label_robust_score(0.9, 0.8, 0.7, 0.6, w=1.5)
    with pytest.raises(AttarError, match=r"gamma must be in \[0, 1\]"):
        augmentation_robust_score(0.9, 0.8, 0.7, 0.6, gamma=-0.1)


# ------------------------------------------------------------------ the equal-label control


def _soft_artifact(tmp_path):
    b = load_data(DataSpec(name="digits"))
    torch.manual_seed(0)
    teacher = build_model(TINY, b.input_shape, 10, b.mean, b.std)
    save_model(tmp_path / "teacher", teacher)
    out = condense("digits", "random", 2, tmp_path / "r", model=TINY, soft_labels=tmp_path / "teacher", progress=False)
    return b, out


def test_the_control_uses_the_same_teachers_labels_the_same_augmentation_and_the_random_rows(tmp_path, monkeypatch):
    b, out = _soft_artifact(tmp_path)
    calls = []

    def spy(x, y, test_x, test_y, model, bundle, epochs, seed, augment=None, soft=None, temperature=1.0, **kw):
        calls.append({"x": x, "y": y, "epochs": epochs, "augment": augment, "soft": soft, "temperature": temperature})
        return 0.5

    monkeypatch.setattr(E, "_train_eval", spy)
    r = evaluate_condensed(out, nets=2, model=TINY, epochs=3, augment="crop,flip", temperature=2.0, full_data=False,
                           cache_dir=tmp_path / "cache", ranking=True)
    s = load_synthetic(out)
    assert r["random_subset_soft"]["teacher"] == str(tmp_path / "teacher") and r["random_subset_soft"]["temperature"] == 2.0
    # calls: condensed x2, condensed_soft x2, random x2, random_soft x2, condensed_no_aug x2, random_no_aug (soft) x2
    assert len(calls) == 12
    syn_soft, rand_hard, rand_soft = calls[2:4], calls[4:6], calls[6:8]
    teacher = load_model(tmp_path / "teacher")[0]
    index = ClassIndex(b.train.y, 10)
    for i, (h, c) in enumerate(zip(rand_hard, rand_soft)):
        rows = E.random_rows(index, 2, 0, i)
        assert torch.equal(c["x"], b.train.x[rows]) and torch.equal(h["x"], c["x"])  # the same real rows
        assert c["soft"] is not None and torch.equal(c["soft"], predict(teacher, c["x"]).float())  # the same teacher
        assert (c["augment"], c["temperature"], c["epochs"]) == (syn_soft[i]["augment"], syn_soft[i]["temperature"],
                                                                   syn_soft[i]["epochs"]) == ("crop,flip", 2.0, 3)
    assert torch.equal(syn_soft[0]["soft"], s.soft) and torch.equal(s.soft, predict(teacher, s.x).float())
    # the no-augmentation rows keep the labels and drop only the augmentation
    assert all(c["augment"] == "none" and c["soft"] is not None for c in calls[8:])
    assert "augmentation_robust" in r["dd_ranking"] and "label_robust" not in r["dd_ranking"]  # no full-data row


def test_the_control_is_trained_once_per_teacher_and_again_for_another(tmp_path, monkeypatch):
    """Two artifacts labelled by one teacher share the control's nets (cached by the teacher's weights); a teacher with
    other weights, or another temperature, trains it again."""
    b, out = _soft_artifact(tmp_path)
    out2 = condense("digits", "random", 2, tmp_path / "r2", model=TINY, soft_labels=tmp_path / "teacher", seed=1,
                    progress=False)
    soft_calls = []

    def spy(x, y, test_x, test_y, model, bundle, epochs, seed, augment=None, soft=None, temperature=1.0, **kw):
        soft_calls.append(soft is not None)
        return 0.5

    monkeypatch.setattr(E, "_train_eval", spy)

    def control_nets(artifact, **kw):
        soft_calls.clear()
        r = evaluate_condensed(artifact, nets=2, model=TINY, epochs=2, full_data=False, cache_dir=tmp_path / "cache", **kw)
        return sum(soft_calls) - 2, r  # minus the artifact's own two soft-label nets

    assert control_nets(out)[0] == 2
    n, r = control_nets(out2)
    assert n == 0 and "cached" in r["random_subset_soft"]
    assert control_nets(out2, temperature=2.0)[0] == 2
    teacher = load_model(tmp_path / "teacher")[0]
    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)
    save_model(tmp_path / "teacher", teacher)  # the same path, other weights
    assert control_nets(out2)[0] == 2


def test_learned_soft_labels_without_a_teacher_say_there_is_no_control(tmp_path, monkeypatch):
    import shutil

    b, out = _soft_artifact(tmp_path)
    shutil.rmtree(tmp_path / "teacher")  # a teacher gone (or labels a method learned itself) and no full-data net
    monkeypatch.setattr(E, "_train_eval", lambda *a, **k: 0.5)
    r = evaluate_condensed(out, nets=1, model=TINY, epochs=1, full_data=False, cache_dir=tmp_path / "cache")
    assert "random_subset_soft" not in r and any("no equal-label random control" in c for c in r["caveats"])


# ------------------------------------------------------------------ the full-data reference


def test_reference_budget_grows_with_the_data():
    small = E.full_data_budget(1294, condensed_steps=1000)  # digits: 5 steps an epoch
    assert small == {"epochs": 200, "steps": 1000, "steps_per_epoch": 5, "patience_epochs": 20}
    big = E.full_data_budget(54000, condensed_steps=1000)  # fashion-mnist: 210 steps an epoch, 30 epochs at least
    assert big["epochs"] == E.FULL_MIN_EPOCHS and big["steps"] == 30 * 210
    assert E.full_data_budget(1294, 1000, epochs=7)["steps"] == 35  # an explicit budget is kept


def test_reference_split_carves_validation_rows_from_train_when_the_source_has_none():
    y = torch.arange(10).repeat_interleave(30)
    x = torch.arange(300).float().view(300, 1, 1, 1)
    bundle = SimpleNamespace(train=SimpleNamespace(x=x, y=y), val=SimpleNamespace(x=x[:0], y=y[:0]),
                             test=SimpleNamespace(x=-x, y=y), classes=[str(c) for c in range(10)])
    tx, ty, vx, vy, where = E.reference_split(bundle)
    assert "carved" in where and len(vy) == 30 and torch.bincount(vy).tolist() == [3] * 10  # stratified 10%
    assert len(ty) == 270 and not set(tx.flatten().tolist()) & set(vx.flatten().tolist())  # disjoint
    assert (vx >= 0).all()  # never a test row (those are negative here)
    b = load_data(DataSpec(name="digits"))
    assert E.reference_split(b)[4] == "the source's validation split"


def test_on_digits_the_reference_beats_the_small_sets_and_shows_its_budget(tmp_path):
    out = condense("digits", "random", 2, tmp_path / "r", model=TINY, progress=False)
    r = evaluate_condensed(out, nets=1, model=TINY, epochs=30, augment="none", cache_dir=tmp_path / "cache")
    full = r["full_data"]
    assert full["budget"]["epochs"] == 30 and full["budget"]["steps"] == 30 * (1294 // 256)
    assert full["val_from"] == "the source's validation split" and full["val_rows"] == 144
    run = full["trained"][0]
    assert 1 <= run["steps"] <= full["budget"]["steps"] and 1 <= run["best_epoch"] <= run["epochs_trained"]
    assert full["mean"] > r["condensed"]["mean"] and full["mean"] > r["random_subset"]["mean"]
    assert full["mean"] > 0.85, full  # 5 epochs (25 steps) gave 57.66% with the default ConvNet
    # the best weights were put back: the saved net scores its recorded best validation accuracy
    net = load_model(full["models"][0])[0]
    b = load_data(DataSpec(name="digits"))
    assert (predict(net, b.val.x).argmax(1) == b.val.y).float().mean().item() == pytest.approx(run["val_accuracy"])
    table = format_evaluation(r)
    assert f"full training data (1294 rows; budget 30 epochs = {30 * 5} steps; trained {run['steps']} steps" in table
    lr = r["dd_ranking"]["label_robust"]
    assert lr["hlr"] == pytest.approx(full["mean"] - r["condensed"]["mean"])  # hard labels: syn-any = syn-hard
    assert "DD-Ranking label-robust score" in table
