"""``attar lm``: the command-line face of causal-LM distillation (:mod:`attar.distill.lm`).

``app`` is a Typer sub-app, mounted as ``app.add_typer(lm_app, name="lm")``:

* ``attar lm new OUT --layers 4 --d-model 128 --heads 4 --context 128``: a fresh byte-level GPT-2 and
  its tokenizer as a Hugging Face folder (:func:`attar.text.charlm.make_byte_lm`).
* ``attar lm train MODEL --data fortunes --steps 300 --out DIR``: next-token training on the response
  tokens (:func:`~attar.distill.lm.train_lm`); writes the model + tokenizer and ``metrics.json``.
* ``attar lm distill --teacher T --student S --data fortunes --divergence gjsd --set beta=0.5 --out DIR``:
  token-level KD (:func:`~attar.distill.lm.distill_lm`, optionally from a top-k teacher cache and with
  on-policy rows) or, with ``--seq-kd``, sequence-level KD (:func:`~attar.distill.lm.sequence_kd`).
* ``attar lm eval MODEL --data fortunes``: perplexity on the test split.

``--data`` is a built-in text set (``fortunes``, ``tweets``, ``brown``), a ``.txt`` file (one text per non-empty
line), or a ``.csv``/``.tsv``/``.parquet`` file (``--text-column``, default ``text``). Output folders are
written to a hidden temporary folder beside ``--out`` and renamed at the end, so a failure leaves no
partial ``--out``; an existing non-empty ``--out`` is refused unless ``--overwrite`` (which replaces it).
Progress (:mod:`attar.train.progress`): a rich bar updated at every evaluation (``--eval-every``) on a
terminal, a line per evaluation and a summary otherwise (``CI``, a log file), nothing with ``--quiet``;
``--threads`` sets torch's CPU threads. Every ``AttarError`` is printed as one paragraph (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.console import Console

from attar.cli.app import THREADS_HELP
from attar.console import errors_as_messages as _errors_as_messages
from attar.distill.lm_config import LMDistillConfig
from attar.errors import AttarError
from attar.paths import check_out_dir

app = typer.Typer(help="Causal language models: make a byte-level GPT-2, train it, distill it into a smaller one, "
                       "measure perplexity (see docs/lm.md).", add_completion=False, no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

METRICS = "metrics.json"


def _say(msg: str, quiet: bool) -> None:
    """A status line on stderr (not under --quiet or ATTAR_PROGRESS=0)."""
    from attar.train.progress import is_quiet

    if not quiet and not is_quiet():
        err.print(msg, markup=False)


def _start(quiet: bool, threads: Optional[int]) -> None:
    from attar.train.progress import start_command

    start_command(quiet, threads)


# ----------------------------------------------------------------------------------------------
# Output folders: refuse, stage, rename
# ----------------------------------------------------------------------------------------------


def _check_out(dest: Path, overwrite: bool) -> Path:
    dest = check_out_dir(Path(dest).expanduser())
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise AttarError(f"--out {dest} already exists and is not empty; choose another folder, or pass --overwrite "
                         "to replace it.")
    return dest


@contextlib.contextmanager
def _staged(dest: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, on failure it is removed."""
    from attar.io import staged_folder

    with staged_folder(_check_out(dest, overwrite)) as tmp:
        yield tmp


def _write_metrics(folder: Path, metrics: dict[str, Any]) -> None:
    (folder / METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class _Progress:
    """``on_metrics`` hook on the shared progress (:mod:`attar.train.progress`): a bar on a terminal, otherwise a
    line at an evaluation once 30 s or 5% of the steps have passed (the rule of every long command) and a
    summary, nothing with --quiet."""

    def __init__(self, label: str, total: int, quiet: bool):
        from attar.train.progress import StepProgress

        self.total, self.last = total, 0
        self.bar = StepProgress(label, total, enabled=False if quiet else None)

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, step: int, rec: dict) -> None:
        fields = {k: float(rec[k]) for k in ("loss", "val_ppl", "teacher_nll_of_samples") if k in rec}
        self.bar.update(step - self.last, **fields)
        self.last = step


def _overrides(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _validated(overrides: dict[str, Any]) -> Any:
    """The full :class:`LMDistillConfig` (same checks as the API: unknown divergence, its parameters, the guard)."""
    from attar.distill.lm import _config

    return _config(None, overrides)


# ----------------------------------------------------------------------------------------------
# Shared options
# ----------------------------------------------------------------------------------------------

def _default(field: str) -> Any:
    """A setting's default, read from the config model (one place for every default; the module has no torch)."""
    return LMDistillConfig.model_fields[field].default


DATA = typer.Option(..., "--data", "-d", help="a built-in set (attar data list) | file.txt (one text per line) | file.jsonl/.csv/.tsv/.parquet | a datasets folder (save_to_disk)")
TEXT_COLUMN = typer.Option(None, "--text-column", help="text field/column of a .jsonl/.csv/.tsv/.parquet file or datasets folder (default text)")
PROMPT_LEN = typer.Option(16, "--prompt-len", help="tokens of each text kept as the prompt (never scored)")
MAX_LEN = typer.Option(None, "--max-len", help="tokens per row, prompt included (default min(128, model context))")
TRAIN_LIMIT = typer.Option(None, "--train-limit", help="training rows kept")
VAL_LIMIT = typer.Option(None, "--val-limit", help="validation rows kept")
TEST_LIMIT = typer.Option(None, "--test-limit", help="test rows kept (the same rows for every seed)")
STEPS = typer.Option(None, "--steps", help=f"optimizer steps (default {_default('steps')})")
BATCH = typer.Option(None, "--batch-size", help=f"rows per step (default {_default('batch_size')})")
LR = typer.Option(None, "--lr", help=f"peak AdamW learning rate (default {_default('lr')})")
WARMUP = typer.Option(None, "--warmup-steps", help=f"linear warm-up steps before the cosine decay (default {_default('warmup_steps')})")
EVAL_EVERY = typer.Option(None, "--eval-every", help=f"steps between validation evaluations (default {_default('eval_every')})")
SEED = typer.Option(0, "--seed", help="seeds the validation split, data order, sampling and dropout")
OUT = typer.Option(..., "--out", "-o", help="output folder (model, tokenizer, metrics.json); written atomically")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing non-empty --out")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress output")
THREADS = typer.Option(None, "--threads", help=THREADS_HELP)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


@app.command("new")
@_errors_as_messages
def new_cli(
    dest: Path = typer.Argument(..., metavar="OUT", help="folder to write (model + byte-level tokenizer)"),
    layers: int = typer.Option(4, "--layers", min=1),
    d_model: int = typer.Option(128, "--d-model", min=1, help="embedding width (divisible by --heads)"),
    heads: int = typer.Option(4, "--heads", min=1),
    context: int = typer.Option(128, "--context", min=2, help="positions (the longest row the model reads)"),
    dropout: float = typer.Option(0.0, "--dropout", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed", help="seeds the initial weights"),
    overwrite: bool = OVERWRITE,
) -> None:
    """Write a freshly initialised byte-level GPT-2 (258-token vocabulary) and its tokenizer to OUT."""
    from attar.text.charlm import BYTE_VOCAB, make_byte_lm

    dest = _check_out(dest, overwrite)
    with _staged(dest, overwrite) as tmp:
        model = make_byte_lm(tmp, layers=layers, d_model=d_model, heads=heads, context=context, seed=seed,
                             dropout=dropout)
    n = sum(p.numel() for p in model.parameters())
    out.print(f"new GPT-2 {layers}x{d_model} ({heads} heads, context {context}), {n:,} parameters, byte-level "
              f"tokenizer ({BYTE_VOCAB} tokens) -> {dest}", markup=False)


@app.command("train")
@_errors_as_messages
def train_cli(
    model_dir: Path = typer.Argument(..., help="Hugging Face causal-LM folder (e.g. from `attar lm new`)"),
    data: str = DATA,
    text_column: Optional[str] = TEXT_COLUMN,
    prompt_len: int = PROMPT_LEN,
    max_len: Optional[int] = MAX_LEN,
    train_limit: Optional[int] = TRAIN_LIMIT,
    val_limit: Optional[int] = VAL_LIMIT,
    test_limit: Optional[int] = TEST_LIMIT,
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH,
    lr: Optional[float] = LR,
    warmup_steps: Optional[int] = WARMUP,
    eval_every: Optional[int] = EVAL_EVERY,
    seed: int = SEED,
    dest: Path = OUT,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    threads: Optional[int] = THREADS,
) -> None:
    """Next-token training of MODEL_DIR on the response tokens of --data; writes the model and metrics.json."""
    from attar.distill.lm import perplexity, train_lm
    from attar.text.charlm import load_causal_lm, save_causal_lm

    _start(quiet, threads)
    t0 = time.perf_counter()
    dest = _check_out(dest, overwrite)
    ov = _overrides(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, eval_every=eval_every, seed=seed)
    cfg = _validated({"alpha": 1.0} | ov)
    from attar.text.lm_io import (  # torch: only when a command runs
        lm_context,
        lm_dataset,
        load_lm,
        scored_vocab,
    )

    model, tok = load_lm(model_dir, "model")
    d = lm_dataset(data, tok, lm_context(model), text_column=text_column, prompt_len=prompt_len, max_len=max_len, seed=seed,
              train_limit=train_limit, val_limit=val_limit, test_limit=test_limit)
    _say(f"data: {d.info['sizes']} rows, {d.info['response_tokens']['train']:,} training response tokens", quiet)
    with _Progress("train", cfg.steps, quiet) as prog:
        res = train_lm(model, d, on_metrics=prog, progress=False, **ov)
    with _staged(dest, overwrite) as tmp:
        save_causal_lm(model, tok, tmp)
        saved, _ = load_causal_lm(tmp)  # measure what was written
        v = scored_vocab(saved, tok)
        metrics = {
            "command": "train", "model": str(model_dir), "data": d.info,
            "test_ppl": perplexity(saved, d.test, d.pad_id, vocab_size=v),
            "val_ppl": perplexity(saved, d.val, d.pad_id, vocab_size=v) if len(d.val) else None,
            "steps": res.metrics["steps"], "train_seconds": res.metrics["train_seconds"],
            "best_val_ppl": res.metrics["best_val_ppl"], "restored_step": res.metrics["restored_step"],
            "scored_vocab": v, "config": res.metrics["config"], "history": res.history,
        }
        metrics["seconds"] = time.perf_counter() - t0
        _write_metrics(tmp, metrics)
    val = f"{metrics['val_ppl']:.3f}" if metrics["val_ppl"] is not None else "n/a"
    out.print(f"trained {metrics['steps']} steps in {metrics['train_seconds']:.1f}s: test perplexity "
              f"{metrics['test_ppl']:.3f}, validation {val} -> {dest}", markup=False)


@app.command("distill")
@_errors_as_messages
def distill_cli(
    teacher_dir: Path = typer.Option(..., "--teacher", "-t", help="teacher causal-LM folder"),
    student_dir: Path = typer.Option(..., "--student", "-s", help="student causal-LM folder (same tokenizer)"),
    data: str = DATA,
    divergence: Optional[str] = typer.Option(None, "--divergence", help=f"{_default('divergence')} (default), reverse_kl, js, gjsd, tvd, "
                                             "skew_kl, skew_reverse_kl, sinkhorn, ... (`attar methods` lists all)"),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="divergence parameter, e.g. --set beta=0.5"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=f"KD temperature (default {_default('temperature')})"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help=f"weight of CE on ground truth; KD gets 1 - alpha (default {_default('alpha')})"),
    on_policy: Optional[float] = typer.Option(None, "--on-policy", help="fraction of each batch continued by the student "
                                              f"and scored by the teacher (GKD; default {_default('on_policy')})"),
    sample_temperature: Optional[float] = typer.Option(None, "--sample-temperature", help=f"student sampling temperature (default {_default('sample_temperature')})"),
    min_ground_truth: Optional[float] = typer.Option(None, "--min-ground-truth", help="teacher-hacking guard: "
                                                     f"ground-truth fraction kept in every batch (default {_default('min_ground_truth')})"),
    stop_on_hacking: bool = typer.Option(False, "--stop-on-hacking", help="stop when teacher hacking is suspected"),
    cache_topk: Optional[int] = typer.Option(None, "--cache-topk", min=1, help="run the teacher once and keep its "
                                             "top-k log-probs per token (+ tail bucket)"),
    cache_file: Optional[Path] = typer.Option(None, "--cache-file", help="reuse/write the top-k cache here (safetensors)"),
    seq_kd: bool = typer.Option(False, "--seq-kd", help="sequence-level KD: CE on teacher samples of the training prompts"),
    gen_temperature: float = typer.Option(1.0, "--gen-temperature", help="teacher sampling temperature (--seq-kd)"),
    text_column: Optional[str] = TEXT_COLUMN,
    prompt_len: int = PROMPT_LEN,
    max_len: Optional[int] = MAX_LEN,
    train_limit: Optional[int] = TRAIN_LIMIT,
    val_limit: Optional[int] = VAL_LIMIT,
    test_limit: Optional[int] = TEST_LIMIT,
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH,
    lr: Optional[float] = LR,
    warmup_steps: Optional[int] = WARMUP,
    eval_every: Optional[int] = EVAL_EVERY,
    seed: int = SEED,
    dest: Path = OUT,
    overwrite: bool = OVERWRITE,
    quiet: bool = QUIET,
    threads: Optional[int] = THREADS,
) -> None:
    """Distill --teacher into --student on --data (token-level KD, or --seq-kd); writes the student and metrics.json."""
    from attar.cli.app import parse_sets
    from attar.distill.lm import (
        distill_lm,
        perplexity,
        sequence_kd,
        teacher_generations,
    )
    from attar.distill.lm_objectives import LMTeacherCache, check_vocab
    from attar.text.charlm import load_causal_lm, save_causal_lm

    _start(quiet, threads)
    t0 = time.perf_counter()
    dest = _check_out(dest, overwrite)
    base = _overrides(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, eval_every=eval_every,
                      seed=seed)
    bad = [x for x in sets or [] if "=" not in x or not x.split("=", 1)[0].strip()]
    if bad:
        raise AttarError(f"--set {bad[0]!r}: expected NAME=VALUE, a parameter of the divergence, e.g. --set beta=0.5 "
                         "(gjsd) or --set alpha=0.1 (skew_kl).")
    div_args = parse_sets(sets)
    if seq_kd:
        given = [f for f, v in (("--divergence", divergence), ("--set", sets), ("--temperature", temperature),
                                ("--alpha", alpha), ("--on-policy", on_policy), ("--sample-temperature", sample_temperature),
                                ("--min-ground-truth", min_ground_truth), ("--cache-topk", cache_topk),
                                ("--cache-file", cache_file)) if v]
        if given or stop_on_hacking:
            given += ["--stop-on-hacking"] if stop_on_hacking else []
            raise AttarError(f"--seq-kd trains the student with cross-entropy on the teacher's samples; "
                             f"{', '.join(given)} only apply to token-level KD. Drop them, or drop --seq-kd.")
        ov = base
        cfg = _validated({"alpha": 1.0} | ov)
    else:
        ov = base | _overrides(divergence=divergence, temperature=temperature, alpha=alpha, on_policy=on_policy,
                               sample_temperature=sample_temperature, min_ground_truth=min_ground_truth)
        if div_args:
            ov["divergence_args"] = div_args
        if stop_on_hacking:
            ov["stop_on_hacking"] = True
        cfg = _validated(ov)
        if cache_file is not None and cache_topk is None:
            raise AttarError("--cache-file needs --cache-topk K (how many teacher log-probs to keep per token).")
        if cache_topk is not None and cfg.alpha >= 1:
            raise AttarError("--cache-topk with --alpha 1 has no effect: alpha = 1 is pure cross-entropy, the teacher is "
                             "never read. Lower --alpha, or drop --cache-topk.")
    from attar.text.lm_io import (  # torch: only when a command runs
        lm_context,
        lm_dataset,
        load_lm,
    )

    teacher, ttok = load_lm(teacher_dir, "teacher")
    student, stok = load_lm(student_dir, "student")
    vmap = check_vocab(teacher, student, ttok, stok)  # before any data, cache or step
    contexts = [c for c in (lm_context(teacher), lm_context(student)) if c]
    d = lm_dataset(data, stok, min(contexts) if contexts else None, text_column=text_column, prompt_len=prompt_len,
              max_len=max_len, seed=seed, train_limit=train_limit, val_limit=val_limit, test_limit=test_limit)
    _say(f"data: {d.info['sizes']} rows, {d.info['response_tokens']['train']:,} training response tokens", quiet)
    v = vmap.student_size
    teacher.eval()
    teacher_ppl = perplexity(teacher, d.test, d.pad_id, vocab_size=v)
    before_ppl = perplexity(student, d.test, d.pad_id, vocab_size=v)
    with _Progress("seq-kd" if seq_kd else "distill", cfg.steps, quiet) as prog:
        if seq_kd:
            _say(f"sampling the teacher's continuations of {len(d.train)} training prompts", quiet)
            gens = teacher_generations(teacher, d.train, d.pad_id, d.eos_id, gen_temperature, seed, vocab_size=v)
            res = sequence_kd(student, teacher, d, generations=gens, gen_temperature=gen_temperature, progress=False,
                              student_tokenizer=stok, teacher_tokenizer=ttok, on_metrics=prog, **ov)
        else:
            cache = None
            if cache_topk is not None:
                kw = dict(vmap=vmap, pad_id=d.pad_id)
                if cache_file is not None:
                    cache, built = LMTeacherCache.load_or_build(cache_file, teacher, d.train.ids, cache_topk,
                                                                cfg.temperature, **kw)
                    _say(f"teacher cache {'built and saved to' if built else 'reused from'} {cache_file}", quiet)
                else:
                    cache = LMTeacherCache.build(teacher, d.train.ids, cache_topk, cfg.temperature, **kw)
            res = distill_lm(student, d, teacher, cache=cache, student_tokenizer=stok, teacher_tokenizer=ttok,
                             on_metrics=prog, progress=False, **ov)
    with _staged(dest, overwrite) as tmp:
        save_causal_lm(student, stok, tmp)
        saved, _ = load_causal_lm(tmp)  # measure what was written
        m = res.metrics
        metrics = {
            "command": "distill", "mode": "sequence-kd" if seq_kd else "token-kd",
            "teacher": str(teacher_dir), "student": str(student_dir), "data": d.info,
            "teacher_test_ppl": teacher_ppl, "student_test_ppl": perplexity(saved, d.test, d.pad_id, vocab_size=v),
            "student_test_ppl_before": before_ppl,
            "student_val_ppl": perplexity(saved, d.val, d.pad_id, vocab_size=v) if len(d.val) else None,
            "teacher_hacking_suspected": m["teacher_hacking_suspected"], "stopped_at": m["stopped_at"],
            "restored_step": m["restored_step"], "best_val_ppl": m["best_val_ppl"], "best_step": m["best_step"],
            "on_policy_rows": m["on_policy_rows"], "teacher_signal": m["teacher"], "steps": m["steps"],
            "train_seconds": m["train_seconds"], "scored_vocab": v, "config": m["config"], "history": res.history,
        }
        metrics["seconds"] = time.perf_counter() - t0
        _write_metrics(tmp, metrics)
    flag = "  TEACHER HACKING SUSPECTED (see history)" if metrics["teacher_hacking_suspected"] else ""
    out.print(f"{metrics['mode']}: student test perplexity {metrics['student_test_ppl']:.3f} (before {before_ppl:.3f}; "
              f"teacher {teacher_ppl:.3f}), {metrics['steps']} steps in {metrics['train_seconds']:.1f}s -> {dest}{flag}",
              markup=False)


@app.command("eval")
@_errors_as_messages
def eval_cli(
    model_dir: Path = typer.Argument(..., help="Hugging Face causal-LM folder"),
    data: str = DATA,
    split: str = typer.Option("test", "--split", help="test | val | train"),
    text_column: Optional[str] = TEXT_COLUMN,
    prompt_len: int = PROMPT_LEN,
    max_len: Optional[int] = MAX_LEN,
    train_limit: Optional[int] = TRAIN_LIMIT,
    val_limit: Optional[int] = VAL_LIMIT,
    test_limit: Optional[int] = TEST_LIMIT,
    seed: int = typer.Option(0, "--seed", help="seeds the validation split (the test split is the same for every seed)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    threads: Optional[int] = THREADS,
) -> None:
    """Perplexity of MODEL_DIR on the response tokens of a split of --data (same options as train/distill)."""
    from attar.distill.lm import perplexity

    _start(False, threads)
    if split not in ("test", "val", "train"):
        raise AttarError(f"--split {split!r}: choose test, val or train.")
    from attar.text.lm_io import (  # torch: only when a command runs
        lm_context,
        lm_dataset,
        load_lm,
        scored_vocab,
    )

    model, tok = load_lm(model_dir, "model")
    d = lm_dataset(data, tok, lm_context(model), text_column=text_column, prompt_len=prompt_len, max_len=max_len, seed=seed,
              train_limit=train_limit, val_limit=val_limit, test_limit=test_limit)
    rows = getattr(d, split)
    if len(rows) == 0:
        raise AttarError(f"the {split} split of --data {data!r} is empty.")
    ppl = perplexity(model, rows, d.pad_id, vocab_size=scored_vocab(model, tok))
    res = {"model": str(model_dir), "split": split, "perplexity": ppl, "rows": len(rows),
           "response_tokens": rows.response_tokens, "data": d.info}
    if as_json:
        typer.echo(json.dumps(res, default=str))
    else:
        out.print(f"{split} perplexity {ppl:.3f} ({len(rows)} rows, {rows.response_tokens:,} response tokens)", markup=False)
