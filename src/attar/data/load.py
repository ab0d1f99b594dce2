"""``load_data``: one DataSpec in, one DataBundle out, with splits fixed by the spec.

Order of decisions (each from its own seeded stream, see ``splits``):
1. test: the source's official test split, else a stratified carve with the constant ``TEST_SEED``;
2. validation: ``val_fraction`` of the remaining labeled rows, seeded by ``spec.seed`` (never from test);
3. ``train_limit``: a stratified subset of what is left for training;
4. ``labeled_per_class``: keep that many labels per class, the rest become -1 (still in train).
Validation is chosen before the limit so runs that differ only in ``train_limit`` share one validation set.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attar.errors import AttarError
from attar.specs import DataSpec
from attar.data.artifact import data_hash, load_synthetic
from attar.data.builtin import BUILTINS
from attar.data.bundle import DataBundle, Split, train_stats
from attar.data.files import load_hf_disk, load_imagefolder, load_table
from attar.data.raw import Raw
from attar.data.splits import (
    LABELED, LIMIT, TEST, TEST_SEED, VAL,
    fraction_count, labeled_subset, rng_for, stratified_pick,
)  # fmt: skip

FILE_TEST_FRACTION = 0.2  # file sources without a test split get a 20% carved test split


def list_datasets() -> list[dict[str, Any]]:
    """Built-in data sets with whether they are installed here and how to install them."""
    out = []
    for name in BUILTINS.names():
        ds = BUILTINS.get(name)
        out.append({"name": name, "description": ds.description, "available": ds.available(), "install": ds.install})
    return out


def _read_source(spec: DataSpec) -> tuple[Raw, str, int | float]:
    src = spec.source
    if src == "name":
        ds = BUILTINS.get(spec.name)
        return ds.load(), spec.name, ds.carve_test or FILE_TEST_FRACTION
    if src == "imagefolder":
        return load_imagefolder(spec.imagefolder), Path(spec.imagefolder).name, FILE_TEST_FRACTION
    if src in ("csv", "parquet"):
        path = getattr(spec, src)
        return load_table(path, src, spec.label_column), Path(path).stem, FILE_TEST_FRACTION
    if src == "hf_disk":
        return load_hf_disk(spec.hf_disk, spec.label_column, spec.image_column), Path(spec.hf_disk).name, FILE_TEST_FRACTION
    if src == "artifact":
        raise AssertionError("artifact specs are read by load_data via attar.condense")
    raise AssertionError(src)


def _tensor(x: np.ndarray, idx: np.ndarray, divisor: float) -> torch.Tensor:
    # Fancy indexing copies, so the result never aliases a cached (read-only) source array.
    t = torch.from_numpy(np.ascontiguousarray(x[idx])).to(torch.float32)
    return t.div_(divisor) if divisor != 1.0 else t


def _check_labels(y: np.ndarray, classes: list[str], where: str) -> None:
    if len(y) and (y.min() < -1 or y.max() >= len(classes)):
        raise AttarError(f"{where}: labels must be in -1..{len(classes) - 1} for {len(classes)} classes")


def load_data(spec: DataSpec) -> DataBundle:
    """Read the spec's source and split it; the same spec always yields identical tensors."""
    if spec.source == "artifact":  # a condensed set: its source's val/test, the synthetic rows as train
        return bundle_from_artifact(spec)
    if spec.source == "stage":
        raise AttarError(
            f"data {{stage: {spec.stage}}} names a recipe stage's output; it is only readable inside `attar run`. "
            "Outside a recipe, point at the stage's folder instead: {artifact: runs/<id>/<stage>/data}."
        )
    raw, name, carve = _read_source(spec)
    classes = list(raw.classes)
    y_all = np.asarray(raw.y, dtype=np.int64)
    _check_labels(y_all, classes, f"data set {name!r}")
    labeled = np.flatnonzero(y_all >= 0)  # unlabeled source rows only ever go to the train pool

    if raw.x_test is None:
        n_test = carve if isinstance(carve, int) else fraction_count(len(labeled), carve)
        if n_test < 1 or n_test >= len(labeled):
            raise AttarError(
                f"data set {name!r} has {len(labeled)} labeled rows, too few to carve a test split of {n_test}; "
                "add rows, or provide a separate test split"
            )
        pos, _ = stratified_pick(y_all[labeled], n_test, rng_for(TEST_SEED, TEST))
        test_idx = labeled[pos]
        x_test_src, y_test_src = raw.x, y_all
        in_pool = np.ones(len(y_all), dtype=bool)
        in_pool[test_idx] = False
        test_info = f"carved {n_test} rows, stratified, seed {TEST_SEED} (fixed for every spec)"
    else:
        x_test_src, y_test_src = raw.x_test, np.asarray(raw.y_test, dtype=np.int64)
        _check_labels(y_test_src, classes, f"data set {name!r} (test)")
        test_idx = np.arange(len(y_test_src))
        in_pool = np.ones(len(y_all), dtype=bool)
        test_info = raw.info.get("test_split", "official")

    pool_labeled = labeled[in_pool[labeled]]
    pos, _ = stratified_pick(y_all[pool_labeled], fraction_count(len(pool_labeled), spec.val_fraction), rng_for(spec.seed, VAL))
    val_idx = pool_labeled[pos]
    in_pool[val_idx] = False
    train_idx = np.flatnonzero(in_pool)
    if spec.train_limit is not None and spec.train_limit < len(train_idx):
        pos, _ = stratified_pick(y_all[train_idx], spec.train_limit, rng_for(spec.seed, LIMIT))
        train_idx = train_idx[pos]
    if len(train_idx) == 0:
        raise AttarError(f"data set {name!r}: no training rows left after the test and validation splits; lower val_fraction")
    y_train = y_all[train_idx].copy()
    if spec.labeled_per_class is not None:
        y_train = labeled_subset(y_train, spec.labeled_per_class, rng_for(spec.seed, LABELED), classes)

    train = Split(_tensor(raw.x, train_idx, raw.divisor), torch.from_numpy(y_train), classes)
    val = Split(_tensor(raw.x, val_idx, raw.divisor), torch.from_numpy(y_all[val_idx].copy()), classes)
    test = Split(_tensor(x_test_src, test_idx, raw.divisor), torch.from_numpy(y_test_src[test_idx].copy()), classes)
    mean, std = train_stats(train.x)
    info = copy.deepcopy({k: v for k, v in raw.info.items() if k != "test_split"})  # raw.info may be cached
    info.update(
        source=spec.source,
        spec=spec.model_dump(),
        sizes={"train": len(train), "train_labeled": train.num_labeled, "val": len(val), "test": len(test)},
        test_split=test_info,
    )
    return DataBundle(
        train=train, val=val, test=test, classes=classes, input_shape=tuple(train.x.shape[1:]),
        mean=mean, std=std, name=name, info=info,
    )  # fmt: skip


def bundle_from_artifact(spec: DataSpec) -> DataBundle:
    """``load_data(DataSpec(artifact=DIR))``: the source data set's val/test splits with the synthetic train split.

    Validation and test come from the source spec recorded in the artifact (so a model trained
    on the condensed set is scored on the same rows as one trained on the real data), and the
    normalisation statistics are the source's (synthetic images live in the same pixel space).
    """
    s = load_synthetic(spec.artifact)
    src = s.meta.get("data_spec")
    if not src:
        raise AttarError(f"condensed set {spec.artifact} records no source data spec (state.json 'data_spec').")
    source = load_data(DataSpec.model_validate(src))
    if tuple(source.input_shape) != tuple(s.x.shape[1:]):
        raise AttarError(
            f"condensed set {spec.artifact} holds inputs of shape {tuple(s.x.shape[1:])} but its source data "
            f"{source.name!r} has {tuple(source.input_shape)}; the artifact is damaged or its data_spec was edited."
        )
    want = s.meta.get("data_hash")
    if want:
        got = data_hash(source.train.x, source.train.y)
        if got != want:
            raise AttarError(
                f"condensed set {spec.artifact} was made from data with hash {want[:12]}…, but its source spec now "
                f"loads data with hash {got[:12]}…: the source data set changed. Re-run `attar condense`."
            )
    source.train = Split(s.x.contiguous(), s.y.contiguous(), list(source.classes))
    source.info = dict(source.info, condensed={k: s.meta.get(k) for k in ("method", "ipc", "seed", "model", "iterations")},
                       artifact=str(spec.artifact), soft_labels=s.soft is not None)
    source.name = f"{source.name}[{s.meta.get('method')}-ipc{s.meta.get('ipc')}]"
    return source
