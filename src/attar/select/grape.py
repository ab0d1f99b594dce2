"""GRAPE-style response selection for fine-tuning data (Zhang et al., "The Best Instruction-Tuning Data are
Those That Fit", 2025): when each prompt comes with several candidate responses (from different models or
annotators), keep, per prompt, the one the *target* model (the model about to be fine-tuned) finds most
likely, then fine-tune on the kept pairs.

Scoring. For a prompt ``p`` and a response ``r`` tokenized separately by the target model's tokenizer, the
sequence ``[BOS] p r`` (``BOS`` only if the tokenizer has one; with ``chat_template=True`` the prompt is
wrapped by the tokenizer's chat template instead) is run through the causal LM once, and the response's
log-likelihood is ``sum_j log softmax(logits[t_j - 1])[r_j]`` over the response tokens ``r_j`` at positions
``t_j``. ``normalize="mean"`` (default) divides by the number of response tokens (length-normalised, so long
responses are not penalised for their length); ``"sum"`` keeps the total. ``eos=True`` also scores the
end-of-sequence token after the response. A response with no scorable token scores ``-inf`` (never kept
unless every candidate is empty). Ties keep the earliest candidate.

Any scorer works in place of a Hugging Face model: ``scorer(prompts, responses) -> scores`` (two equally
long lists of strings; one float per pair, higher = more likely).

Data. A list of ``{"prompt": str, "responses": [str, ...]}`` (wide) or of ``{"prompt": str, "response": str}``
(long; rows with the same prompt text are the candidates of that prompt), or a file:

* ``.jsonl`` (one record per line) or ``.json`` (a list of records), wide or long as above;
* ``.csv``: long (``prompt,response`` columns, one row per candidate), or wide with a ``responses`` column
  holding a JSON list, or wide with several ``response_1, response_2, ...`` columns (empty cells skipped).

Candidates are grouped by exact prompt text, in order of first appearance. Column names are configurable.
The output (:meth:`GrapeResult.write`) is long format, one row per prompt: ``prompt, response`` (what SFT
reads) plus ``score``, ``chosen`` (index of the kept candidate), ``candidates`` and, in JSONL, all ``scores``.

Cost accounting (``GrapeResult.stats``): ``prompts``, ``candidates``, ``scoring_forward_rows`` (sequences run
through a no-grad forward), ``scoring_tokens`` (tokens in those forwards), ``scored_tokens`` (response tokens
scored), ``truncated`` (sequences cut to ``max_length``), ``empty_responses``, ``select_seconds``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from attar.errors import AttarError

Scorer = Callable[[list[str], list[str]], Sequence[float]]
Normalize = Literal["mean", "sum"]


# ----------------------------------------------------------------------------------------------- data
def _responses_of(rec: dict[str, Any], response_column: str | None, where: str) -> list[str]:
    cols = [response_column] if response_column else ["responses", "response"]
    for c in cols:
        if c in rec and rec[c] is not None:
            v = rec[c]
            if isinstance(v, str) and c.endswith("s") and v.lstrip().startswith("["):
                try:
                    v = json.loads(v)  # a CSV cell holding a JSON list
                except json.JSONDecodeError:
                    raise AttarError(f"{where}: column {c!r} holds {v[:60]!r}, not a JSON list of responses.") from None
            if isinstance(v, str):
                return [v]
            if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
                return list(v)
            raise AttarError(f"{where}: column {c!r} must be a string or a list of strings, got {type(v).__name__}.")
    numbered = sorted((k for k in rec if isinstance(k, str) and k.startswith("response_") and k[9:].isdigit()),
                      key=lambda k: int(k[9:]))
    if numbered and not response_column:
        return [rec[k] for k in numbered if isinstance(rec[k], str) and rec[k] != ""]
    raise AttarError(f"{where}: no response column; expected {' or '.join(repr(c) for c in cols)}"
                     f"{'' if response_column else ' or response_1, response_2, ...'}; the record has: "
                     f"{', '.join(map(str, rec)) or '(nothing)'}.")


def group_candidates(records: Iterable[dict[str, Any]] | dict[str, Sequence[str]], prompt_column: str = "prompt",
                     response_column: str | None = None, where: str = "data") -> list[dict[str, Any]]:
    """Records (wide or long) -> ``[{"prompt": p, "responses": [...]}, ...]`` grouped by prompt text, in order of
    first appearance. A ``{prompt: [responses]}`` mapping is accepted too."""
    if isinstance(records, dict):
        records = [{prompt_column: k, "responses": list(v) if not isinstance(v, str) else [v]} for k, v in records.items()]
        response_column = "responses"
    groups: dict[str, list[str]] = {}
    for i, rec in enumerate(records):
        w = f"{where} record {i + 1}"
        if not isinstance(rec, dict):
            raise AttarError(f"{w}: expected a mapping with {prompt_column!r} and responses, got {type(rec).__name__}.")
        if prompt_column not in rec or not isinstance(rec[prompt_column], str):
            raise AttarError(f"{w}: no text column {prompt_column!r} (columns: {', '.join(map(str, rec))}); "
                             "set prompt_column.")
        groups.setdefault(rec[prompt_column], []).extend(_responses_of(rec, response_column, w))
    if not groups:
        raise AttarError(f"{where}: no records.")
    return [{"prompt": p, "responses": r} for p, r in groups.items()]


def read_candidates(path: str | Path, prompt_column: str = "prompt",
                    response_column: str | None = None) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` / ``.json`` / ``.csv`` file of prompts with candidate responses (see the module doc)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AttarError(f"{p}: no such file (give a .jsonl, .json or .csv of prompts with candidate responses).")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        recs = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AttarError(f"{p}:{n}: not valid JSON ({e.msg}).") from None
    elif suffix == ".json":
        try:
            recs = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise AttarError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}).") from None
        if not isinstance(recs, (list, dict)):
            raise AttarError(f"{p}: expected a list of records or a {{prompt: [responses]}} mapping.")
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            recs = list(csv.DictReader(f))
    else:
        raise AttarError(f"{p}: unknown format {suffix or '(no suffix)'!r}; use .jsonl, .json or .csv.")
    return group_candidates(recs, prompt_column, response_column, where=str(p))


# ----------------------------------------------------------------------------------------------- scoring
def load_causal_lm(path: str | Path) -> tuple[Any, Any]:
    """``(AutoModelForCausalLM, AutoTokenizer)`` from a local Hugging Face folder (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise AttarError(f"--model {p}: not a Hugging Face model folder (no config.json); give a folder written by "
                         "save_pretrained.")
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
        except TypeError:  # pragma: no cover - transformers 4
            model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise AttarError(f"--model {p}: cannot load a causal LM and its tokenizer ({type(e).__name__}: {e}).") from None
    return model, tok


def _ids(enc: Any) -> list[int]:
    if isinstance(enc, dict) or hasattr(enc, "keys"):
        enc = enc["input_ids"]
    if isinstance(enc, torch.Tensor):
        enc = enc.tolist()
    if enc and isinstance(enc[0], list):
        enc = enc[0]
    return [int(i) for i in enc]


def _prompt_ids(tokenizer: Any, prompt: str, chat_template: bool) -> list[int]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise AttarError("chat_template=True, but the tokenizer has no chat template; score without it.")
        return _ids(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True))
    bos = tokenizer.bos_token_id
    return ([int(bos)] if bos is not None else []) + _ids(tokenizer(prompt, add_special_tokens=False))


def response_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], *,
                      normalize: Normalize = "mean", eos: bool = False, chat_template: bool = False,
                      batch_size: int = 8, max_length: int = 1024, stats: dict[str, float] | None = None) -> list[float]:
    """Log-likelihood of each ``responses[i]`` after ``prompts[i]`` under a Hugging Face causal LM.

    ``normalize="mean"``: per response token (length-normalised); ``"sum"``: the total. Sequences longer
    than ``max_length`` keep the start of the response and the end of the prompt. Runs in eval mode without
    gradients, ``batch_size`` sequences per forward (right-padded), on the model's device."""
    if len(prompts) != len(responses):
        raise AttarError(f"response_logprobs: {len(prompts)} prompts but {len(responses)} responses.")
    if normalize not in ("mean", "sum"):
        raise AttarError(f"normalize: {normalize!r} is not one of: mean, sum.")
    if batch_size < 1 or max_length < 2:
        raise AttarError(f"batch_size must be >= 1 and max_length >= 2 (got {batch_size}, {max_length}).")
    st = stats if stats is not None else {}
    for k in ("scoring_forward_rows", "scoring_tokens", "scored_tokens", "truncated", "empty_responses"):
        st.setdefault(k, 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else int(pad)
    eos_id = tokenizer.eos_token_id
    if eos and eos_id is None:
        raise AttarError("eos=True, but the tokenizer has no end-of-sequence token.")
    prompt_cache: dict[str, list[int]] = {}
    seqs: list[tuple[list[int], int]] = []  # (token ids, index where the response starts)
    for p, r in zip(prompts, responses):
        if p not in prompt_cache:
            prompt_cache[p] = _prompt_ids(tokenizer, p, chat_template)
        ctx = prompt_cache[p]
        rid = _ids(tokenizer(r, add_special_tokens=False)) + ([int(eos_id)] if eos else [])
        if len(ctx) + len(rid) > max_length:
            st["truncated"] += 1
            rid = rid[: max_length - 1]
            ctx = ctx[len(ctx) - (max_length - len(rid)):]
        seqs.append((ctx + rid, len(ctx)))
    device = next((q.device for q in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    scores = [0.0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths together: less padding
    try:
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                rows = order[b : b + batch_size]
                width = max(len(seqs[i][0]) for i in rows)
                ids = torch.full((len(rows), width), pad, dtype=torch.long)
                att = torch.zeros((len(rows), width), dtype=torch.long)
                target = torch.zeros((len(rows), width), dtype=torch.bool)  # token t is a scored response token
                for j, i in enumerate(rows):
                    s, start = seqs[i]
                    ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
                    att[j, : len(s)] = 1
                    target[j, max(1, start) : len(s)] = True  # position 0 has nothing before it
                logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
                # logits at t-1 predict token t: only the scored positions go through log_softmax
                where = target[:, 1:].to(device)
                lp = torch.log_softmax(logits[:, :-1][where].float(), -1)
                tok_lp = lp.gather(1, ids[:, 1:].to(device)[where].unsqueeze(1)).squeeze(1).double().cpu()
                counts = target[:, 1:].sum(1)
                sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(
                    0, torch.repeat_interleave(torch.arange(len(rows)), counts), tok_lp)
                for j, i in enumerate(rows):
                    n = int(counts[j])
                    if n == 0:
                        st["empty_responses"] += 1
                        scores[i] = -math.inf
                    else:
                        scores[i] = float(sums[j] / n) if normalize == "mean" else float(sums[j])
                st["scoring_forward_rows"] += len(rows)
                st["scoring_tokens"] += int(att.sum())
                st["scored_tokens"] += int(counts.sum())
    finally:
        if was:
            model.train()
    return scores


def hf_scorer(model: Any, tokenizer: Any, stats: dict[str, float] | None = None, **kw: Any) -> Scorer:
    """A :data:`Scorer` backed by :func:`response_logprobs` (``kw``: normalize, eos, chat_template, ...)."""
    return lambda prompts, responses: response_logprobs(model, tokenizer, prompts, responses, stats=stats, **kw)


# ----------------------------------------------------------------------------------------------- selection
@dataclass
class GrapeResult:
    """One row per prompt (``prompt``, ``response``, ``score``, ``chosen``, ``candidates``, ``scores``) and the cost."""

    rows: list[dict[str, Any]]
    stats: dict[str, float] = field(default_factory=dict)

    def pairs(self) -> tuple[list[str], list[str]]:
        """``(prompts, responses)`` of the kept pairs, ready for SFT."""
        return [r["prompt"] for r in self.rows], [r["response"] for r in self.rows]

    def write(self, path: str | Path) -> Path:
        """``.jsonl`` (every field), ``.json`` (a list of records) or ``.csv`` (all but the per-candidate scores)."""
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        suffix = p.suffix.lower()
        clean = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in self.rows]
        for r in clean:
            r["scores"] = [None if math.isinf(s) else s for s in r["scores"]]
        if suffix == ".jsonl":
            p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean), encoding="utf-8")
        elif suffix == ".json":
            p.write_text(json.dumps(clean, ensure_ascii=False, indent=1), encoding="utf-8")
        elif suffix == ".csv":
            cols = ["prompt", "response", "score", "chosen", "candidates"]
            with p.open("w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                w.writeheader()
                w.writerows(clean)
        else:
            raise AttarError(f"--out {p}: unknown format {suffix or '(no suffix)'!r}; use .jsonl, .json or .csv.")
        return p


def grape_select(data: str | Path | Iterable[dict[str, Any]] | dict[str, Sequence[str]], model: Any = None,
                 tokenizer: Any = None, *, scorer: Scorer | None = None, normalize: Normalize = "mean",
                 eos: bool = False, chat_template: bool = False, batch_size: int = 8, max_length: int = 1024,
                 prompt_column: str = "prompt", response_column: str | None = None) -> GrapeResult:
    """Keep, per prompt, the candidate response the target model finds most likely (GRAPE).

    ``data``: a file path or records (see the module doc). Score with a Hugging Face causal LM
    (``model`` + ``tokenizer``, or ``model`` = a local model folder) or with ``scorer(prompts, responses)``.
    Returns the kept pairs with their scores and the cost of scoring."""
    t0 = time.perf_counter()
    if isinstance(data, (str, Path)):
        groups = read_candidates(data, prompt_column, response_column)
    else:
        groups = group_candidates(data, prompt_column, response_column)
    stats: dict[str, float] = {"prompts": len(groups), "candidates": sum(len(g["responses"]) for g in groups)}
    if (scorer is None) == (model is None):
        raise AttarError("grape_select: give either a model (with its tokenizer, or a model folder) or a scorer.")
    if scorer is None:
        if isinstance(model, (str, Path)):
            model, tokenizer = load_causal_lm(model)
        if tokenizer is None:
            raise AttarError("grape_select: a Hugging Face model needs its tokenizer (or pass a model folder).")
        scorer = hf_scorer(model, tokenizer, stats=stats, normalize=normalize, eos=eos, chat_template=chat_template,
                           batch_size=batch_size, max_length=max_length)
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    scores = [float(s) for s in scorer(prompts, responses)] if responses else []
    if len(scores) != len(responses):
        raise AttarError(f"the scorer returned {len(scores)} scores for {len(responses)} (prompt, response) pairs.")
    rows, at = [], 0
    for g in groups:
        s = scores[at : at + len(g["responses"])]
        at += len(g["responses"])
        if not s:
            continue  # a prompt without candidates keeps nothing
        best = max(range(len(s)), key=lambda i: (s[i], -i))  # the first of equal maxima
        rows.append({"prompt": g["prompt"], "response": g["responses"][best], "score": s[best], "chosen": best,
                     "candidates": len(s), "scores": s})
    stats["select_seconds"] = time.perf_counter() - t0
    return GrapeResult(rows, stats)
