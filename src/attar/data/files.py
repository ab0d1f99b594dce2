"""Data a user brings: image folders, CSV / Parquet tables, Hugging Face ``save_to_disk`` folders.

Every problem found while reading is reported as an ``AttarError`` naming the file,
column or row, because these errors are the user's to fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from attar.errors import AttarError
from attar.data.raw import Raw, sha256_files, sha256_tree

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MAX_NAMED = 10  # name at most this many offending files/rows in one message


def _names(items: Sequence[Any], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(str(i) for i in items[:MAX_NAMED])
    return shown + (f" (and {total - MAX_NAMED} more)" if total > MAX_NAMED else "")


def _existing(path: str, kind: str, want_dir: bool) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise AttarError(f"{kind} path {str(p)!r} does not exist")
    if want_dir and not p.is_dir():
        raise AttarError(f"{kind} path {str(p)!r} is not a folder")
    if not want_dir and not p.is_file():
        raise AttarError(f"{kind} path {str(p)!r} is not a file")
    return p


# --- labels ------------------------------------------------------------------------------


def encode_labels(values: Sequence[Any] | np.ndarray, where: str) -> tuple[np.ndarray, list[str]]:
    """Map raw labels to 0..K-1 over their sorted distinct values (numbers sorted numerically).

    Integral floats (``1.0``, which pandas makes of int columns with gaps) count as ints,
    so class names read ``"1"``, not ``"1.0"``.
    """
    arr = np.asarray(values, dtype=object)
    missing = [i for i, v in enumerate(arr) if v is None or (isinstance(v, float) and np.isnan(v))]
    if missing:
        raise AttarError(
            f"{where}: {len(missing)} rows have no label (rows {_names(missing)}); drop them or fill the label"
        )
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in arr):
        nums = np.asarray(arr, dtype=np.float64)
        if not np.all(nums == np.round(nums)):
            example = nums[nums != np.round(nums)][0]
            raise AttarError(f"{where}: labels must be class ids or names, found non-integer values such as {example}")
        ints = nums.astype(np.int64)
        distinct = np.unique(ints)
        return np.searchsorted(distinct, ints).astype(np.int64), [str(int(v)) for v in distinct]
    strs = np.asarray([str(v) for v in arr])
    distinct = np.unique(strs)
    return np.searchsorted(distinct, strs).astype(np.int64), [str(v) for v in distinct]


# --- images --------------------------------------------------------------------------------


def pil_to_array(images: list[Any], names: list[str]) -> np.ndarray:
    """Stack decoded PIL images into uint8 [N, C, H, W].

    All grayscale -> 1 channel, otherwise RGB for every image, so a folder mixing
    modes still gives one consistent tensor. Sizes must agree: resizing silently would
    hide a wrong file in the folder.
    """
    if not images:
        raise AttarError("no images to stack")
    mode = "L" if all(im.mode in GRAY_MODES for im in images) else "RGB"
    size = images[0].size
    odd = [f"{n} ({im.size[0]}x{im.size[1]})" for n, im in zip(names, images) if im.size != size]
    if odd:
        raise AttarError(
            f"images must all have the same size; {names[0]} is {size[0]}x{size[1]} but these differ: "
            f"{_names(odd)}. Resize them (or remove them) and load again."
        )
    arrs = []
    for im in images:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            # 16-bit / float grayscale: scale to 8 bits instead of clipping at 255.
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
            a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            a = np.asarray(im.convert(mode), dtype=np.uint8)
        arrs.append(a)
    x = np.stack(arrs)
    return x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2).copy()


def _decode_image_files(files: list[Path], root: Path) -> np.ndarray:
    from PIL import Image

    images, bad = [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()  # decode now: a truncated file fails here, not at training time
                images.append(im.copy())
        except Exception as e:  # Pillow raises several types for bad files
            bad.append(f"{f.relative_to(root)} ({type(e).__name__}: {e})")
    if bad:
        raise AttarError(
            f"cannot read {len(bad)} image file(s) under {root}: {_names(bad)}. Remove or replace them."
        )
    return pil_to_array(images, [str(f.relative_to(root)) for f in files])


def _class_folders(root: Path) -> dict[str, list[Path]]:
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p.name for p in visible if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if loose:
        raise AttarError(
            f"image folder {root} has images outside class subfolders: {_names(loose)}. "
            "Put each image in a subfolder named after its class (root/<class>/<image>)."
        )
    out = {}
    for d in (p for p in visible if p.is_dir()):
        files = sorted(
            f for f in d.rglob("*")
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS and not any(part.startswith(".") for part in f.relative_to(d).parts)
        )  # fmt: skip
        out[d.name] = files
    return out


def load_imagefolder(path: str) -> Raw:
    """``root/<class>/<image>``, or ``root/train/<class>/...`` with an optional ``root/test/<class>/...``.

    Classes are the sorted subfolder names (union over train and test). A ``root/val``
    folder is not used (validation is always carved from train) and is listed in
    ``info["folders_ignored"]``.
    """
    root = _existing(path, "imagefolder", want_dir=True)
    # root/train/<class>/ (no loose images in train/) means the split layout, not a class named "train".
    train_dir = root / "train"
    split_layout = train_dir.is_dir() and any(p.is_dir() for p in train_dir.iterdir()) and not any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTS for p in train_dir.iterdir()
    )
    parts = {"train": train_dir} if split_layout else {"train": root}
    if split_layout and (root / "test").is_dir():
        parts["test"] = root / "test"
    ignored = sorted(
        p.name for p in root.iterdir()
        if split_layout and p.is_dir() and p.name not in ("train", "test") and not p.name.startswith(".")
    )  # fmt: skip
    folders = {k: _class_folders(v) for k, v in parts.items()}
    classes = sorted(set().union(*(f.keys() for f in folders.values())))
    if not classes:
        raise AttarError(
            f"image folder {root} has no class subfolders; expected root/<class>/<image>.png (PNG or JPEG)"
        )
    empty = [str((parts[k] / c).relative_to(root)) for k, f in folders.items() for c, files in f.items() if not files]
    if empty:
        raise AttarError(
            f"image folder {root}: these class subfolders hold no images ({', '.join(sorted(IMAGE_EXTS))}): "
            f"{_names(empty)}. Add images or remove the subfolders."
        )
    all_files, labels, split_of = [], [], []
    for k, f in folders.items():
        for c, files in f.items():
            all_files += files
            labels += [classes.index(c)] * len(files)
            split_of += [k] * len(files)
    x = _decode_image_files(all_files, root)  # decoded together so the mode and size checks span both splits
    y = np.asarray(labels, dtype=np.int64)
    is_test = np.asarray([s == "test" for s in split_of])
    info = {"files": str(root), "num_files": len(all_files), "sha256_tree": sha256_tree(all_files, root)}
    if ignored:
        info["folders_ignored"] = ignored
    if "test" in parts:
        info["test_split"] = "test/ subfolder"
        return Raw(x=x[~is_test], y=y[~is_test], x_test=x[is_test], y_test=y[is_test],
                   classes=classes, divisor=255.0, info=info)  # fmt: skip
    return Raw(x=x, y=y, classes=classes, divisor=255.0, info=info)


# --- tables ----------------------------------------------------------------------------------


def table_to_raw(df: Any, label_column: str, where: str) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Split a DataFrame into float32 features (every column but the label) and encoded labels."""
    import pandas as pd

    if label_column not in df.columns:
        raise AttarError(
            f"{where}: no label column {label_column!r}; columns are {_names([str(c) for c in df.columns])}. "
            "Set label_column in the data spec."
        )
    features = [c for c in df.columns if c != label_column]
    if not features:
        raise AttarError(f"{where}: only the label column {label_column!r}; there are no feature columns")
    bad = [str(c) for c in features if not (pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]))]
    if bad:
        raise AttarError(
            f"{where}: feature columns must be numeric, these are not: {_names(bad)}. "
            "Encode them as numbers or drop them before loading."
        )
    x = df[features].to_numpy(dtype=np.float32)
    nan_cols = [str(c) for c, has in zip(features, np.isnan(x).any(axis=0)) if has]
    if nan_cols:
        raise AttarError(f"{where}: missing values in feature columns {_names(nan_cols)}; fill or drop those rows")
    y, classes = encode_labels(df[label_column].tolist(), f"{where} label column {label_column!r}")
    return x, y, classes, [str(c) for c in features]


def load_table(path: str, kind: str, label_column: str) -> Raw:
    import pandas as pd

    p = _existing(path, kind, want_dir=False)
    try:
        df = pd.read_csv(p) if kind == "csv" else pd.read_parquet(p)
    except Exception as e:
        raise AttarError(f"cannot read {kind} file {p}: {type(e).__name__}: {e}") from None
    if len(df) == 0:
        raise AttarError(f"{kind} file {p} has no rows")
    x, y, classes, features = table_to_raw(df, label_column, f"{kind} file {p}")
    return Raw(x=x, y=y, classes=classes, info={"files": str(p), "sha256": sha256_files([p]), "features": features})


# --- Hugging Face datasets saved with save_to_disk ------------------------------------------------


def _find_image_column(ds: Any, label_column: str, image_column: str | None, where: str) -> str | None:
    from datasets import Image

    cols = ds.column_names
    if image_column:
        if image_column not in cols:
            raise AttarError(f"{where}: no image column {image_column!r}; columns are {_names(cols)}")
        return image_column
    typed = [c for c in cols if isinstance(ds.features[c], Image) and c != label_column]
    if len(typed) > 1:
        raise AttarError(f"{where}: several image columns {typed}; set image_column in the data spec")
    if typed:
        return typed[0]
    for c in ("image", "img", "pixel_values", "pixels"):
        if c in cols and c != label_column:
            return c
    return None


def _hf_images(ds: Any, col: str, where: str) -> tuple[np.ndarray, float]:
    """Images from a column of PIL images or of arrays ([H, W], [H, W, C] or [C, H, W])."""
    from datasets import Image

    if isinstance(ds.features[col], Image):
        images = ds[col]
        return pil_to_array(images, [f"{where} row {i}" for i in range(len(images))]), 255.0
    try:
        arr = np.asarray(ds.with_format("numpy")[col])
    except Exception as e:
        raise AttarError(f"{where}: cannot stack image column {col!r} ({e}); do all images have the same size?") from None
    if arr.dtype == object:
        raise AttarError(f"{where}: images in column {col!r} differ in shape; resize them to one size")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        # HWC is the Hugging Face / PIL convention, so it wins when a shape could be either.
        if arr.shape[-1] in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)
        elif arr.shape[1] in (1, 3, 4):
            pass
        elif arr.shape[-1] == 4:
            arr = arr.transpose(0, 3, 1, 2)
        else:
            raise AttarError(
                f"{where}: cannot tell the channel axis of image column {col!r} with shape {arr.shape[1:]}; "
                "store images as [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4"
            )
    else:
        raise AttarError(f"{where}: image column {col!r} must hold 2-D or 3-D arrays, got shape {arr.shape[1:]}")
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise AttarError(f"{where}: integer images in column {col!r} must be in 0..255")
        return np.ascontiguousarray(arr.astype(np.uint8)), 255.0
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise AttarError(f"{where}: float images in column {col!r} must be in [0, 1] scale (found {arr.min():.3g}..{arr.max():.3g})")
    return np.ascontiguousarray(arr), 1.0


def _hf_features(ds: Any, label_column: str, where: str) -> np.ndarray:
    """Numeric feature columns: scalars, or fixed-length number lists flattened in column order."""
    cols = [c for c in ds.column_names if c != label_column]
    if not cols:
        raise AttarError(f"{where}: only the label column {label_column!r}; there are no feature columns")
    numpy_ds = ds.with_format("numpy")
    parts, bad = [], []
    for c in cols:
        try:
            a = np.asarray(numpy_ds[c])
        except Exception:
            bad.append(c)
            continue
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            bad.append(c)
            continue
        parts.append(a.reshape(len(a), -1).astype(np.float32))
    if bad:
        raise AttarError(
            f"{where}: feature columns must be numeric (numbers or equal-length number lists), these are not: "
            f"{_names(bad)}. Drop them, or name the image column with image_column."
        )
    x = np.concatenate(parts, axis=1)
    if np.isnan(x).any():
        raise AttarError(f"{where}: missing values in feature columns; fill or drop those rows")
    return x


def load_hf_disk(path: str, label_column: str, image_column: str | None) -> Raw:
    """A ``datasets`` folder from ``save_to_disk``: a DatasetDict (``train``, optional ``test``) or one Dataset."""
    root = _existing(path, "hf_disk", want_dir=True)
    try:
        from datasets import ClassLabel, DatasetDict, load_from_disk
    except ImportError:
        raise AttarError("hf_disk data needs the `datasets` package: pip install datasets") from None
    try:
        obj = load_from_disk(str(root))
    except Exception as e:
        raise AttarError(
            f"cannot load {root} as a Hugging Face dataset saved with save_to_disk ({type(e).__name__}: {e})"
        ) from None
    if isinstance(obj, DatasetDict):
        if "train" not in obj:
            raise AttarError(f"hf_disk {root} has splits {list(obj)} but no 'train' split; rename one to 'train'")
        splits = {"train": obj["train"]}
        if "test" in obj:
            splits["test"] = obj["test"]
        ignored = [s for s in obj if s not in splits]
    else:
        splits, ignored = {"train": obj}, []
    first = splits["train"]
    where = f"hf_disk {root}"
    for name, ds in splits.items():
        if label_column not in ds.column_names:
            raise AttarError(
                f"{where} ({name}): no label column {label_column!r}; columns are {_names(ds.column_names)}. "
                "Set label_column in the data spec."
            )
    image_col = _find_image_column(first, label_column, image_column, where)
    xs, divisor = [], 1.0
    for name, ds in splits.items():
        if image_col:
            x, divisor = _hf_images(ds, image_col, f"{where} ({name})")
        else:
            x = _hf_features(ds, label_column, f"{where} ({name})")
        xs.append(x)
    if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
        raise AttarError(f"{where}: train rows have shape {xs[0].shape[1:]} but test rows {xs[1].shape[1:]}")
    feature = first.features[label_column]
    raw_labels = [ds[label_column] for ds in splits.values()]
    if isinstance(feature, ClassLabel):
        classes = list(feature.names)
        ys = [np.asarray(v, dtype=np.int64) for v in raw_labels]  # ClassLabel uses -1 for "no label"
    else:
        y_all, classes = encode_labels(sum((list(v) for v in raw_labels), []), f"{where} label column {label_column!r}")
        ys = np.split(y_all, [len(raw_labels[0])])
    info = {
        "files": str(root),
        "sha256": sha256_files(sorted(p for p in root.rglob("*") if p.is_file()), root),
        "splits_ignored": ignored,
        "image_column": image_col,
    }
    if "test" in splits:
        info["test_split"] = "hf test split"
        return Raw(x=xs[0], y=ys[0], x_test=xs[1], y_test=ys[1], classes=classes, divisor=divisor, info=info)
    return Raw(x=xs[0], y=ys[0], classes=classes, divisor=divisor, info=info)
