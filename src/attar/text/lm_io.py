"""Causal language models and their text, as the LM commands take them: a model folder checked to be a causal LM,
its context length and scored vocabulary, and texts from a built-in set, a .txt/.jsonl/.csv/.tsv/.parquet file or a
datasets folder (:mod:`attar.text.text_stream`) split into prompt + continuation rows
(:func:`attar.text.charlm.lm_data`). Errors name the command-line option a user
gave (``--data``, ``--max-len``, ``--text-column``) because that is where these values come from."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from attar.errors import AttarError
from attar.io import sha256_file
from attar.text.charlm import lm_data, load_causal_lm
from attar.text.text_stream import CHUNK, read_texts

__all__ = ["read_texts", "read_pairs", "pair_stream", "PairStream", "lm_dataset", "load_lm", "lm_context", "scored_vocab"]


def load_lm(path: Path, role: str) -> tuple[Any, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise AttarError(f"the {role} folder {p} does not exist; make a fresh byte-level GPT-2 with `attar lm new {p}` "
                         "or give a Hugging Face causal-LM folder (config.json, weights, tokenizer).")
    if not p.is_dir():
        raise AttarError(f"the {role} {p} is a file; give a Hugging Face causal-LM folder (config.json, weights, tokenizer).")
    model_type = model_type_of(p)
    if model_type is not None:
        if not is_causal_lm_type(model_type):
            raise AttarError(f"the {role} folder {p} holds a {model_type!r} model, which is not a causal language model "
                             "(AutoModelForCausalLM cannot load it); give a causal-LM folder such as one written by "
                             "`attar lm new`.")
    try:
        return load_causal_lm(p)
    except AttarError as e:
        raise AttarError(f"{role}: {e}") from None


def model_type_of(folder: Path) -> str | None:
    """``model_type`` of the folder's config.json, or None when it is missing, unreadable or has none."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None  # load_causal_lm explains a missing or broken config.json
    return cfg.get("model_type") if isinstance(cfg, dict) else None


def is_causal_lm_type(model_type: str) -> bool:
    """Whether ``AutoModelForCausalLM`` loads models of this ``model_type`` (llama, qwen2, gpt2, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def lm_context(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    for a in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, a, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def scored_vocab(model: Any, tok: Any) -> int | None:
    """Cut logits padded past the tokenizer (those tokens never occur); None when nothing to cut."""
    emb = model.get_output_embeddings()
    v = int(emb.weight.shape[0]) if emb is not None else None
    return len(tok) if v is not None and len(tok) < v else None


def lm_dataset(data: str, tok: Any, context: int | None, *, text_column: Optional[str], prompt_len: int,
          max_len: Optional[int], seed: int, train_limit: Optional[int], val_limit: Optional[int],
          test_limit: Optional[int], store: Path | None = None, log: Any = None) -> Any:
    """Prompt + continuation rows of ``data`` (:func:`attar.text.charlm.lm_data`); with ``store`` read a chunk at a
    time into a token store there (the same rows)."""
    if max_len is None:
        max_len = min(128, context) if context else 128
    elif context and max_len > context:
        raise AttarError(f"--max-len {max_len} is longer than the model's context of {context} positions; "
                         f"lower --max-len to at most {context}.")
    if store is not None:
        return lm_data(data, tok, prompt_len=prompt_len, max_len=max_len, seed=seed, train_limit=train_limit,
                       val_limit=val_limit, test_limit=test_limit, store=store, text_column=text_column, log=log)
    return lm_data(read_texts(data, text_column), tok, prompt_len=prompt_len, max_len=max_len, seed=seed,
                   train_limit=train_limit, val_limit=val_limit, test_limit=test_limit)


def read_pairs(data: str, prompt_field: str, response_field: str) -> tuple[list[str], list[str]]:
    """Prompt/response rows from a .jsonl (one JSON object per line), .csv, .tsv or .parquet file."""
    prompts, responses = [], []
    for p, r in pair_stream(data, prompt_field, response_field).chunks():
        prompts += p
        responses += r
    return prompts, responses


def pair_stream(data: str, prompt_field: str, response_field: str) -> "PairStream":
    """The :class:`PairStream` of ``data.name``, checked (a known kind of file that exists)."""
    p = Path(data).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv", ".parquet", ".pq"):
        raise AttarError(f"data {data!r}: prompt/response rows come from a .jsonl, .csv, .tsv or .parquet file.")
    if not p.is_file():
        raise AttarError(f"data {p}: no such file.")
    return PairStream(suffix, str(p), prompt_field, response_field)


@dataclass(frozen=True)
class PairStream:
    """Prompt/response rows of a file, read ``size`` rows at a time (so a file larger than memory can be tokenised
    into a token store); :func:`read_pairs` gathers the same rows into lists. Every value is read as text (a CSV
    cell ``007`` stays ``007``); rows with either value missing are skipped, except in .jsonl, where a missing field
    is refused naming the line."""

    kind: str
    name: str
    prompt_field: str
    response_field: str

    @property
    def column(self) -> str:
        return f"{self.prompt_field}\0{self.response_field}"

    def fingerprint(self) -> str:
        """sha256 of the file's content and the two fields: a token store built from it is reused while unchanged."""
        h = hashlib.sha256(f"{self.kind}\0{self.column}\0".encode())
        h.update(sha256_file(self.name).encode())
        return h.hexdigest()

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[list[str], list[str]]]:
        """``(prompts, responses)`` of up to ``size`` rows at a time, in file order."""
        p, fields = Path(self.name), (self.prompt_field, self.response_field)
        if self.kind == ".jsonl":
            out: tuple[list[str], list[str]] = ([], [])
            for n, line in _numbered_lines(p):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise AttarError(f"data {p}, line {n}: not valid JSON ({e.msg}).") from None
                missing = [f for f in fields if not isinstance(row, dict) or f not in row]
                if missing:
                    have = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                    raise AttarError(f"data {p}, line {n}: no field {missing[0]!r} (the row has {have}); set "
                                     "data.prompt_field / data.response_field to the names your rows use.")
                out[0].append(str(row[fields[0]]))
                out[1].append(str(row[fields[1]]))
                if len(out[0]) == size:
                    yield out
                    out = ([], [])
            if out[0]:
                yield out
            return
        try:
            if self.kind in (".parquet", ".pq"):
                import pyarrow.parquet as pq

                f = pq.ParquetFile(p)
                names = f.schema_arrow.names
                self._check(p, names)
                batches = ((b.column(0).to_pylist(), b.column(1).to_pylist())
                           for b in f.iter_batches(batch_size=size, columns=list(fields)))
            else:
                import pandas as pd

                reader = pd.read_csv(p, sep="\t" if self.kind == ".tsv" else ",", chunksize=size, dtype=str)
                batches = self._csv(p, reader, fields)
            for prompts, responses in batches:
                kept = [(str(a), str(b)) for a, b in zip(prompts, responses) if _present(a) and _present(b)]
                if kept:
                    yield [a for a, _ in kept], [b for _, b in kept]
        except AttarError:
            raise
        except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
            raise AttarError(f"data {p}: cannot read it ({type(e).__name__}: {e}).") from None

    def _check(self, p: Path, names: list[str]) -> None:
        for f in (self.prompt_field, self.response_field):
            if f not in names:
                cols = ", ".join(repr(str(c)) for c in list(names)[:20])
                raise AttarError(f"data {p}: no column {f!r}; the columns are {cols}. Set data.prompt_field / "
                                 "data.response_field.")

    def _csv(self, p: Path, reader: Any, fields: tuple[str, str]) -> Iterator[tuple[list, list]]:
        for df in reader:
            self._check(p, list(df.columns))
            yield df[fields[0]].tolist(), df[fields[1]].tolist()


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a file and their numbers (counting blank ones), read one at a time."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))
