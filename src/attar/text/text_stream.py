"""Plain text for language models, read a chunk of texts at a time: a built-in set, a list of strings, or a file a
user brings (``.txt`` one text per line, ``.jsonl`` one JSON object per line, ``.csv``/``.tsv``, ``.parquet``, or a
``datasets`` folder written by ``save_to_disk``).

A :class:`TextStream` never holds more than one chunk of a file's texts, so a corpus larger than memory can be
tokenised into a token store (:mod:`attar.text.token_store`); :func:`read_texts` is the same reading gathered into
a list, for the in-memory routes. Blank texts are skipped. Mistakes are one paragraph naming the file: a missing
field or column lists those that exist, a file without any text says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from attar.errors import AttarError
from attar.io import sha256_file

FILE_KINDS = (".txt", ".jsonl", ".csv", ".tsv", ".parquet", ".pq")
CHUNK = 1024  # texts per chunk


def _names(cols: Sequence[object]) -> str:
    cols = [str(c) for c in cols]
    shown = ", ".join(repr(c) for c in cols[:20])
    return shown + (f" (and {len(cols) - 20} more)" if len(cols) > 20 else "") if cols else "none"


@dataclass(frozen=True)
class TextStream:
    """Where texts come from: ``kind`` is ``builtin``, ``texts``, ``datasets`` or a file suffix; ``column`` the field,
    column or ``datasets`` column holding the text (``text`` unless named)."""

    kind: str
    name: str
    column: str = "text"
    texts: tuple[str, ...] | None = None

    def chunks(self, size: int = CHUNK) -> Iterator[list[str]]:
        """The non-blank texts, in source order, ``size`` at a time (checked: a source without text is refused)."""
        n = 0
        for chunk in self._raw_chunks(size):
            chunk = [t for t in chunk if t.strip()]
            n += len(chunk)
            if chunk:
                yield chunk
        if n == 0:
            raise AttarError(f"{self.where}: no text in it (every row is empty{self._column_hint}); nothing to "
                             "train on. Check the file, or the column that holds the text.")

    @property
    def where(self) -> str:
        return f"text set {self.name!r}" if self.kind in ("builtin", "texts") else f"data {self.name}"

    @property
    def _column_hint(self) -> str:
        return f" in column {self.column!r}" if self.kind not in ("builtin", "texts", ".txt") else ""

    def fingerprint(self) -> str:
        """sha256 of the source's content (the files' bytes, a built-in set's files, a list's texts) and the column:
        a token store built from it is reused only while this is unchanged."""
        h = hashlib.sha256(f"{self.kind}\0{self.column}\0".encode())
        if self.kind == "texts":
            for t in self.texts or ():
                h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        elif self.kind == "builtin":
            from attar.text.sources import TEXT_BUILTINS

            for f in TEXT_BUILTINS.get(self.name).files():
                h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
        elif self.kind == "datasets":
            root = Path(self.name)
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                h.update(str(f.relative_to(root)).encode() + b"\0" + sha256_file(f).encode())
        else:
            h.update(sha256_file(self.name).encode())
        return h.hexdigest()

    # ------------------------------------------------------------------ one reader per kind
    def _raw_chunks(self, size: int) -> Iterator[list[str]]:
        if self.kind == "texts":
            texts = list(self.texts or ())
            for i in range(0, len(texts), size):
                yield texts[i : i + size]
        elif self.kind == "builtin":
            from attar.text.sources import TEXT_BUILTINS

            texts = TEXT_BUILTINS.get(self.name).load().texts
            for i in range(0, len(texts), size):
                yield [str(t) for t in texts[i : i + size]]
        elif self.kind == ".txt":
            yield from _batched(_lines(Path(self.name)), size)
        elif self.kind == ".jsonl":
            yield from _batched(self._jsonl(), size)
        elif self.kind in (".csv", ".tsv"):
            yield from self._csv(size)
        elif self.kind in (".parquet", ".pq"):
            yield from self._parquet(size)
        else:
            yield from self._datasets(size)

    def _jsonl(self) -> Iterator[str]:
        for n, line in enumerate(_lines(Path(self.name)), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AttarError(f"data {self.name}, line {n}: not valid JSON ({e.msg}).") from None
            if not isinstance(row, dict) or self.column not in row:
                have = _names(list(row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
                raise AttarError(f"data {self.name}, line {n}: no field {self.column!r} (the row has {have}). Set "
                                 "text_column (--text-column) to the field that holds the text.")
            v = row[self.column]
            yield "" if v is None else str(v)

    def _missing_column(self, cols: Sequence[object]) -> AttarError:
        return AttarError(f"data {self.name}: no text column {self.column!r}; the columns are {_names(cols)}. Set "
                          "text_column (--text-column) to the column that holds the text.")

    def _csv(self, size: int) -> Iterator[list[str]]:
        import pandas as pd

        try:
            reader = pd.read_csv(self.name, sep="\t" if self.kind == ".tsv" else ",", chunksize=size)
            for df in reader:
                if self.column not in df.columns:
                    raise self._missing_column(list(df.columns))
                yield [str(t) for t in df[self.column].dropna().tolist()]
        except AttarError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
            raise AttarError(f"data {self.name}: cannot read it ({type(e).__name__}: {e}).") from None

    def _parquet(self, size: int) -> Iterator[list[str]]:
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(self.name)
        except Exception as e:  # noqa: BLE001
            raise AttarError(f"data {self.name}: cannot read it ({type(e).__name__}: {e}).") from None
        if self.column not in f.schema_arrow.names:
            raise self._missing_column(f.schema_arrow.names)
        for batch in f.iter_batches(batch_size=size, columns=[self.column]):
            yield [str(t) for t in batch.column(0).to_pylist() if t is not None]

    def _datasets(self, size: int) -> Iterator[list[str]]:
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(self.name)  # memory-mapped Arrow: rows are read as they are iterated
        except Exception as e:  # noqa: BLE001
            raise AttarError(f"data {self.name}: cannot load it as a Hugging Face dataset saved with save_to_disk "
                             f"({type(e).__name__}: {e}).") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise AttarError(f"data {self.name}: the dataset has splits {list(ds)} but no 'train'; language-model "
                                 "text is read from 'train' (attar carves validation and test). Rename a split.")
            ds = ds["train"]
        if self.column not in ds.column_names:
            raise self._missing_column(ds.column_names)
        for batch in ds.select_columns([self.column]).iter(batch_size=size):
            yield [str(t) for t in batch[self.column] if t is not None]


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def _batched(items: Iterator[str], size: int) -> Iterator[list[str]]:
    out: list[str] = []
    for t in items:
        out.append(t)
        if len(out) == size:
            yield out
            out = []
    if out:
        yield out


def text_stream(data: str | Sequence[str] | TextStream, text_column: Optional[str] = None) -> TextStream:
    """The :class:`TextStream` of ``--data``/``data.name``: a built-in set, a file or folder path, or a list of texts.
    Checked here (the path exists, its kind is known, ``text_column`` fits it), before any model is loaded."""
    if isinstance(data, TextStream):
        return data
    if not isinstance(data, str):
        if text_column:
            raise AttarError("text_column applies to files, not to a list of texts.")
        return TextStream("texts", "texts", texts=tuple(str(t) for t in data))
    from attar.text.sources import TEXT_BUILTINS

    if data in TEXT_BUILTINS:
        if text_column:
            raise AttarError(f"--text-column applies to .jsonl/.csv/.tsv/.parquet files and datasets folders, not to "
                             f"the built-in set {data!r}.")
        return TextStream("builtin", data)
    p = Path(data).expanduser()
    if p.is_dir():
        if not (p / "dataset_dict.json").is_file() and not (p / "dataset_info.json").is_file():
            raise AttarError(f"--data {p} is a folder but not a datasets folder written by save_to_disk (no "
                             "dataset_info.json or dataset_dict.json in it).")
        return TextStream("datasets", str(p), text_column or "text")
    suffix = p.suffix.lower()
    if suffix not in FILE_KINDS:
        raise AttarError(f"--data {data!r} is neither a built-in text set ({', '.join(TEXT_BUILTINS.names())}) nor a "
                         ".txt (one text per line), .jsonl, .csv, .tsv or .parquet file, nor a datasets folder "
                         "(save_to_disk).")
    if not p.is_file():
        raise AttarError(f"--data {p}: no such file.")
    if suffix == ".txt" and text_column:
        raise AttarError("--text-column applies to .jsonl/.csv/.tsv/.parquet files and datasets folders; a .txt file "
                         "holds one text per line.")
    return TextStream(suffix, str(p), text_column or "text")


def read_texts(data: str, text_column: Optional[str]) -> str | list[str]:
    """A built-in set's name as it is (``lm_data`` loads it), or every non-blank text of the file or folder."""
    s = text_stream(data, text_column)
    if s.kind == "builtin":
        return data
    return [t for chunk in s.chunks() for t in chunk]
