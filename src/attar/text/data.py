"""Text data: a :class:`TextSpec` in, token-id tensors out, with the same split rules as image data.

Splits (see :mod:`attar.data.splits`): a source without an official test split gets a stratified
test carve with the constant ``TEST_SEED`` (every seed is scored on the same rows); validation is
carved from what is left with ``spec.seed``, never from test; ``train_limit`` / ``val_limit`` /
``test_limit`` then keep stratified subsets. Only the rows kept are tokenised.

Tokenisation uses the model's own tokenizer, right padding to the longest kept row (at most
``max_length``), and returns ``LongTensor [N, L]``; the model builds its attention mask from the
pad id (see :class:`attar.text.hf.HFClassifier`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attar.data.splits import LIMIT, TEST, TEST_SEED, VAL, fraction_count, rng_for, stratified_pick
from attar.errors import AttarError
from attar.registry import validation_error
from attar.text.sources import TEXT_BUILTINS, TextRaw, read_hf_disk_text, read_table_text

_SOURCES = ("name", "csv", "parquet", "hf_disk")
VAL_LIMIT, TEST_LIMIT = 11, 12  # purpose tags for the extra seeded choices made here


class TextSpec(BaseModel):
    """Exactly one source: built-in ``name`` (tweets, fortunes), ``csv``, ``parquet`` or ``hf_disk``."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    csv: str | None = None
    parquet: str | None = None
    hf_disk: str | None = None
    text_column: str = Field("text", description="column holding the text (files only)")
    label_column: str = Field("label", description="column holding the class (files only)")
    classes: list[str] | None = Field(None, description="keep only rows of these classes, in this order")
    max_length: int = Field(128, ge=2, le=4096, description="tokens per text, after truncation")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="carved test share when the source has no test split")
    seed: int = 0
    train_limit: int | None = Field(None, gt=0, description="keep at most this many training rows (seeded, stratified)")
    val_limit: int | None = Field(None, gt=0)
    test_limit: int | None = Field(None, gt=0, description="same rows for every seed")

    @model_validator(mode="after")
    def _one_source(self) -> "TextSpec":
        got = [k for k in _SOURCES if getattr(self, k)]
        if len(got) != 1:
            raise ValueError(
                f"a text data spec needs exactly one source among {', '.join(_SOURCES)}; got {got or 'none'} "
                "(e.g. {name: tweets} or {csv: reviews.csv, text_column: review, label_column: stars})"
            )
        return self

    @property
    def source(self) -> str:
        return next(k for k in _SOURCES if getattr(self, k))


def text_spec(spec: TextSpec | dict[str, Any] | str) -> TextSpec:
    """Accept a TextSpec, a mapping, or a bare built-in name."""
    if isinstance(spec, TextSpec):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    try:
        return TextSpec.model_validate(spec)
    except ValidationError as e:
        raise validation_error(f"Invalid text data spec {spec}", e, TextSpec) from None


@dataclass
class TextSplit:
    ids: torch.Tensor  # int64 [N, L], right-padded with pad_id
    y: torch.Tensor  # int64 [N]
    texts: list[str]

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class TextBundle:
    train: TextSplit
    val: TextSplit
    test: TextSplit
    classes: list[str]
    pad_id: int
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def read_text(spec: TextSpec) -> tuple[TextRaw, str]:
    src = spec.source
    if src == "name":
        return TEXT_BUILTINS.get(spec.name).load(), spec.name
    if src in ("csv", "parquet"):
        from pathlib import Path

        path = getattr(spec, src)
        return read_table_text(path, src, spec.text_column, spec.label_column), Path(path).stem
    from pathlib import Path

    return read_hf_disk_text(spec.hf_disk, spec.text_column, spec.label_column), Path(spec.hf_disk).name


def _keep_classes(texts: list[str], y: np.ndarray, classes: list[str], keep: list[str], where: str):
    unknown = [c for c in keep if c not in classes]
    if unknown:
        raise AttarError(f"{where}: classes {unknown} do not exist; the classes are {classes}")
    remap = {classes.index(c): i for i, c in enumerate(keep)}
    rows = [i for i, v in enumerate(y) if int(v) in remap]
    return [texts[i] for i in rows], np.asarray([remap[int(y[i])] for i in rows], dtype=np.int64)


def pad_id_of(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise AttarError(
            f"tokenizer {type(tokenizer).__name__} has neither a pad nor an end-of-sequence token; "
            "set tokenizer.pad_token before tokenising."
        )
    return int(pid)


def tokenize(texts: list[str], tokenizer: Any, max_length: int, batch: int = 4096) -> torch.Tensor:
    """``LongTensor [N, L]``: right-padded ids, ``L`` = the longest tokenised text (at most ``max_length``)."""
    pad = pad_id_of(tokenizer)
    rows: list[list[int]] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], truncation=True, max_length=max_length, padding=False)
        rows += enc["input_ids"]
    length = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def load_text(spec: TextSpec | dict[str, Any] | str, tokenizer: Any) -> TextBundle:
    """Read, split and tokenise; the same spec and tokenizer always give identical tensors."""
    spec = text_spec(spec)
    raw, name = read_text(spec)
    texts, y, classes = list(raw.texts), np.asarray(raw.y, dtype=np.int64), list(raw.classes)
    texts_test, y_test = raw.texts_test, raw.y_test
    if spec.classes:
        texts, y_new = _keep_classes(texts, y, classes, spec.classes, f"text data {name!r}")
        if texts_test is not None:
            texts_test, y_test = _keep_classes(texts_test, np.asarray(y_test), classes, spec.classes, f"text data {name!r} (test)")
        y, classes = y_new, list(spec.classes)
    if len(classes) < 2:
        raise AttarError(f"text data {name!r} has {len(classes)} class(es); classification needs at least 2")
    if texts_test is None:
        n_test = fraction_count(len(y), spec.test_fraction)
        if n_test < 1 or n_test >= len(y):
            raise AttarError(f"text data {name!r} has {len(y)} rows, too few to carve a test split; add rows")
        test_idx, pool = stratified_pick(y, n_test, rng_for(TEST_SEED, TEST))
        t_texts, t_y = [texts[i] for i in test_idx], y[test_idx]
        test_info = f"carved {n_test} rows ({spec.test_fraction:.0%}), stratified, seed {TEST_SEED}"
    else:
        pool = np.arange(len(y))
        t_texts, t_y = list(texts_test), np.asarray(y_test, dtype=np.int64)
        test_info = raw.info.get("test_split", "official")
    if spec.test_limit is not None and spec.test_limit < len(t_y):
        keep, _ = stratified_pick(t_y, spec.test_limit, rng_for(TEST_SEED, TEST_LIMIT))
        t_texts, t_y = [t_texts[i] for i in keep], t_y[keep]
    pos, rest = stratified_pick(y[pool], fraction_count(len(pool), spec.val_fraction), rng_for(spec.seed, VAL))
    val_idx, train_idx = pool[pos], pool[rest]
    if spec.val_limit is not None and spec.val_limit < len(val_idx):
        p, _ = stratified_pick(y[val_idx], spec.val_limit, rng_for(spec.seed, VAL_LIMIT))
        val_idx = val_idx[p]
    if spec.train_limit is not None and spec.train_limit < len(train_idx):
        p, _ = stratified_pick(y[train_idx], spec.train_limit, rng_for(spec.seed, LIMIT))
        train_idx = train_idx[p]
    if len(train_idx) == 0:
        raise AttarError(f"text data {name!r}: no training rows left after the test and validation splits")

    def split(rows_texts: list[str], rows_y: np.ndarray) -> TextSplit:
        ids = tokenize(rows_texts, tokenizer, spec.max_length) if rows_texts else torch.zeros(0, 1, dtype=torch.long)
        return TextSplit(ids, torch.as_tensor(np.asarray(rows_y, dtype=np.int64)), rows_texts)

    train = split([texts[i] for i in train_idx], y[train_idx])
    val = split([texts[i] for i in val_idx], y[val_idx])
    test = split(t_texts, t_y)
    info = {k: v for k, v in raw.info.items() if k != "test_split"}
    info.update(source=spec.source, spec=spec.model_dump(), test_split=test_info,
                sizes={"train": len(train), "val": len(val), "test": len(test)},
                tokens={"train": int(train.ids.shape[1]), "val": int(val.ids.shape[1]), "test": int(test.ids.shape[1])})
    return TextBundle(train, val, test, classes, pad_id_of(tokenizer), name, info)
