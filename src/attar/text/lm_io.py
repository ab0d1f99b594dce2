"""Causal language models and their text, as the LM commands take them: a model folder checked to be a causal LM,
its context length and scored vocabulary, and texts from a built-in set, a .txt/.jsonl/.csv/.tsv/.parquet file or a
datasets folder (:mod:`attar.text.text_stream`) split into prompt + continuation rows
(:func:`attar.text.charlm.lm_data`). Errors name the command-line option a user
gave (``--data``, ``--max-len``, ``--text-column``) because that is where these values come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from attar.errors import AttarError
from attar.text.charlm import lm_data, load_causal_lm
from attar.text.text_stream import read_texts

__all__ = ["read_texts", "read_pairs", "lm_dataset", "load_lm", "lm_context", "scored_vocab"]


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
          test_limit: Optional[int]) -> Any:
    if max_len is None:
        max_len = min(128, context) if context else 128
    elif context and max_len > context:
        raise AttarError(f"--max-len {max_len} is longer than the model's context of {context} positions; "
                         f"lower --max-len to at most {context}.")
    return lm_data(read_texts(data, text_column), tok, prompt_len=prompt_len, max_len=max_len, seed=seed,
                   train_limit=train_limit, val_limit=val_limit, test_limit=test_limit)


def read_pairs(data: str, prompt_field: str, response_field: str) -> tuple[list[str], list[str]]:
    """Prompt/response rows from a .jsonl (one JSON object per line), .csv, .tsv or .parquet file."""
    p = Path(data).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv", ".parquet", ".pq"):
        raise AttarError(f"data {data!r}: prompt/response rows come from a .jsonl, .csv, .tsv or .parquet file.")
    if not p.is_file():
        raise AttarError(f"data {p}: no such file.")
    if suffix == ".jsonl":
        prompts, responses = [], []
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AttarError(f"data {p}, line {n}: not valid JSON ({e.msg}).") from None
            missing = [f for f in (prompt_field, response_field) if not isinstance(row, dict) or f not in row]
            if missing:
                have = ", ".join(map(repr, row)) if isinstance(row, dict) else type(row).__name__
                raise AttarError(f"data {p}, line {n}: no field {missing[0]!r} (the row has {have}); set "
                                 "data.prompt_field / data.response_field to the names your rows use.")
            prompts.append(str(row[prompt_field]))
            responses.append(str(row[response_field]))
        return prompts, responses
    import pandas as pd

    try:
        df = pd.read_parquet(p) if suffix in (".parquet", ".pq") else pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",")
    except Exception as e:  # noqa: BLE001 - any reader failure is the user's file
        raise AttarError(f"data {p}: cannot read it ({type(e).__name__}: {e}).") from None
    for f in (prompt_field, response_field):
        if f not in df.columns:
            cols = ", ".join(repr(str(c)) for c in list(df.columns)[:20])
            raise AttarError(f"data {p}: no column {f!r}; the columns are {cols}. Set data.prompt_field / "
                             "data.response_field.")
    df = df[[prompt_field, response_field]].dropna()
    return [str(x) for x in df[prompt_field]], [str(x) for x in df[response_field]]
