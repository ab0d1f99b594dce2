"""Per-crop relabelling in `condense evaluate` (issue 14, SRe²L's FKD-style labels): the artifact's teacher labels
every augmented batch of the soft-label rows, the condensed set's and its equal-label random control's alike."""

from __future__ import annotations

import shutil

import pytest

import attar.condense.evaluate as E
from attar.condense import evaluate_condensed
from attar.errors import AttarError
from test_condense_fair import TINY, _soft_artifact

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_augmentation_per_crop_labels_are_the_stored_ones(tmp_path):
    _, out = _soft_artifact(tmp_path)
    kw = dict(nets=1, model=TINY, epochs=4, augment="none", full_data=False, compare_random=False, record=False,
              cache_dir=tmp_path / "cache")
    stored = evaluate_condensed(out, relabel="stored", **kw)["condensed_soft"]
    live = evaluate_condensed(out, relabel="per_crop", **kw)["condensed_soft"]
    assert live["relabel"] == "per_crop" and stored["relabel"] == "stored"
    assert live["mean"] == pytest.approx(stored["mean"], abs=1e-9)


def test_per_crop_gives_the_teacher_to_both_soft_rows_and_keeps_hard_rows_hard(tmp_path, monkeypatch):
    _, out = _soft_artifact(tmp_path)
    calls = []

    def spy(x, y, test_x, test_y, model, bundle, epochs, seed, augment=None, soft=None, temperature=1.0, teacher=None,
            **kw):
        calls.append({"soft": soft, "teacher": teacher, "augment": augment})
        return 0.5

    monkeypatch.setattr(E, "_train_eval", spy)
    r = evaluate_condensed(out, nets=2, model=TINY, epochs=3, augment="crop,flip", full_data=False,
                           cache_dir=tmp_path / "cache", relabel="per_crop", record=False)
    hard, syn_soft, rand_hard, rand_soft = calls[0:2], calls[2:4], calls[4:6], calls[6:8]
    assert all(c["teacher"] is None and c["soft"] is None for c in hard + rand_hard)
    assert all(c["teacher"] is not None and c["augment"] == "crop,flip" for c in syn_soft + rand_soft)
    assert all(c["soft"] is None for c in rand_soft)  # no stored labels: the teacher labels each drawn batch
    assert r["random_subset_soft"]["relabel"] == "per_crop"


def test_per_crop_refuses_sets_without_soft_labels_or_teacher_and_unknown_modes(tmp_path):
    _, out = _soft_artifact(tmp_path)
    kw = dict(nets=1, model=TINY, epochs=1, full_data=False, compare_random=False, record=False)
    with pytest.raises(AttarError, match="relabel must be stored or per_crop"):
        evaluate_condensed(out, relabel="crops", **kw)
    with pytest.raises(AttarError, match="relabel per_crop relabels the soft-label rows"):
        evaluate_condensed(out, relabel="per_crop", soft=False, **kw)
    shutil.rmtree(tmp_path / "teacher")
    with pytest.raises(AttarError, match="relabel per_crop needs the teacher"):
        evaluate_condensed(out, relabel="per_crop", **kw)
