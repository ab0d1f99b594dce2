"""``rded``: the teacher's most typical real crops, stitched; soft labels from the same teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attar.condense import condense, load_synthetic
from attar.condense.rded import stitch
from attar.data import load_data
from attar.errors import AttarError
from attar.models import build_model, load_model, save_model
from attar.specs import DataSpec, ModelSpec
from attar.train.trainer import predict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelSpec(arch="convnet", width=8, depth=2)


@pytest.fixture()
def teacher(tmp_path):
    b = load_data(DataSpec(name="digits"))
    torch.manual_seed(0)
    save_model(tmp_path / "teacher", build_model(TINY, b.input_shape, 10, b.mean, b.std))
    return tmp_path / "teacher"


def test_factor_1_whole_images_picks_the_teachers_most_confident_rows(tmp_path, teacher):
    # min_scale 1: every crop is the whole image, so the set is real rows, the lowest teacher CE of the candidates
    out = condense("digits", "rded", 2, tmp_path / "r", model=TINY, progress=False,
                   params={"teacher": str(teacher), "factor": 1, "min_scale": 1.0, "crops": 1, "candidates": 20})
    s = load_synthetic(out)
    b = load_data(DataSpec(name="digits"))
    t = load_model(teacher)[0]
    assert s.x.shape == (20, 1, 8, 8) and s.y.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.allclose(s.soft, predict(t, s.x).float())  # soft labels: the same teacher on the final images
    assert s.meta["soft_label_teacher"] == str(teacher)  # so evaluate's equal-label control uses that teacher too
    from attar.condense.base import ClassIndex, gen

    rows = ClassIndex(b.train.y, 10).draw(20, gen(0, "rded"))
    for c in range(10):
        cand = b.train.x[rows[c]]
        ce = F.cross_entropy(predict(t, cand).float(), torch.full((20,), c), reduction="none")
        best = cand[ce.argsort()[:2]]
        assert torch.allclose(s.x[2 * c:2 * c + 2], best)


def test_stitch_tiles_shrunk_patches_row_major():
    p = torch.stack([torch.full((1, 8, 8), float(v)) for v in (1, 2, 3, 4)])
    img = stitch(p, 2)
    assert img.shape == (1, 8, 8)
    assert img[0, :4, :4].eq(1).all() and img[0, :4, 4:].eq(2).all() and img[0, 4:, :4].eq(3).all() and img[0, 4:, 4:].eq(4).all()


def test_rded_errors_name_the_fix(tmp_path, teacher):
    with pytest.raises(AttarError, match="teacher"):
        condense("digits", "rded", 1, tmp_path / "a", model=TINY, progress=False, params={})
    with pytest.raises(AttarError, match="lower factor"):
        condense("digits", "rded", 1, tmp_path / "b", model=TINY, progress=False, params={"teacher": str(teacher), "factor": 4})
    with pytest.raises(AttarError, match="relabels its images with its own teacher"):
        condense("digits", "rded", 1, tmp_path / "c", model=TINY, progress=False, params={"teacher": str(teacher)},
                 soft_labels=teacher)
