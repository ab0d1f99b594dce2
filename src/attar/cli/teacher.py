"""``attar teacher``: a teacher run once over a corpus, its outputs stored for later use (docs/lm.md, "Stored teacher
outputs").

* ``attar teacher dump --model smollm2-135m --data fortunes --out store/ [--k 32] [--temperature 1] [--max-len 64]``:
  the teacher's top-k log-probs, ids and tail mass at every scored token of the corpus's training rows
  (:func:`attar.distill.lm_store.dump_lm_teacher`), compressed into shards with a manifest. The rows are the ones an
  ``lm`` stage with the same ``data`` block and seed trains on, so a recipe reads the store with
  ``teacher: {store: store/}``. A killed dump resumes when run again with the same arguments (finished shards are
  kept); progress with ETA on stderr.
* ``attar teacher dump --model runs/<id>/teacher --data fashion-mnist --out store/ [--k 10] [--values f32]``: the
  same for an image/table classifier (a model artifact or run stage folder, a packaged classifier such as
  ``mnist-cnn``, or a model spec as YAML): top-k per example of the data set's training rows (default every class),
  read by ``teacher: {store: store/}`` in a ``distill`` stage, the ``stored_teacher`` selector and ``attar teacher
  relabel``. ``--data`` is then an image/table data spec (``digits``, ``'{name: fashion-mnist, train_limit: 2000}'``,
  ``'{artifact: runs/<id>/condense/data}'``).
* ``attar teacher relabel CONDENSED --store store/``: a condensed set's soft labels from a store made on it.
* ``attar teacher show store/``: what a store holds (settings, size, bytes per token), every shard's hash checked.
* ``attar teacher serve --model smollm2-135m --port 8000 [--topk 64]``: the teacher's top-k log-probs over HTTP
  (:mod:`attar.distill.lm_served`; docs/lm.md, "A served teacher"), read by a recipe's ``teacher: {url: ...}``.

``--data`` is a built-in text name or file, or the ``lm`` stage's whole data block as a YAML mapping
(``--data '{name: fortunes, max_len: 64, train_limit: 400}'``); the flags override its fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console

from attar.cli.app import THREADS_HELP
from attar.console import errors_as_messages
from attar.errors import AttarError

app = typer.Typer(help="Stored teacher outputs: run a teacher once over a corpus and keep its top-k per token "
                       "(docs/lm.md).", add_completion=False, no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


def _classifier_model(model: str):
    """``(module, name)`` when ``--model`` is an image/table classifier (a model artifact, a run stage folder holding
    ``model/``, a packaged classifier or a model spec as YAML), else None (a causal LM). The module is built later
    for a spec that needs the data's shape."""
    from attar.models import PRETRAINED
    from attar.specs import ModelSpec

    if model.strip().startswith("{"):
        try:
            return ModelSpec.model_validate(yaml.safe_load(model)), model
        except Exception as e:  # noqa: BLE001  (yaml or pydantic: one message)
            raise AttarError(f"--model {model!r}: not a model spec ({e}).") from None
    folder = Path(model).expanduser()
    for f in (folder, folder / "model"):
        try:
            is_model = (f / "manifest.json").is_file() and json.loads((f / "state.json").read_text()).get("kind") == "model"
        except (OSError, ValueError):
            is_model = False
        if is_model:
            return ModelSpec(artifact=str(f)), str(f)
    if model in PRETRAINED:
        return ModelSpec(pretrained=model), model
    return None


def _data_spec(data: str, **fields):
    """``--data`` for a classifier: a data set name/folder or a data spec as YAML, with the flags that were given."""
    from pydantic import ValidationError

    from attar.registry import validation_error
    from attar.specs import DataSpec

    block = yaml.safe_load(data) if data.strip().startswith("{") else (
        {"imagefolder": data} if Path(data).expanduser().is_dir() else {"name": data})
    if not isinstance(block, dict):
        raise AttarError(f"--data {data!r}: expected a mapping such as '{{name: fashion-mnist, train_limit: 2000}}'.")
    block |= {k: v for k, v in fields.items() if v is not None}
    try:
        return DataSpec(**block)
    except ValidationError as e:
        raise validation_error("--data", e, DataSpec) from None


def _dump_classifier(spec, name: str, data: str, out_dir: Path, *, k, temperature, step, values, train_limit,
                     shard_rows, batch_size, overwrite, quiet) -> None:
    """The classifier path of ``attar teacher dump`` (:func:`attar.distill.cls_store.dump_classifier_teacher`)."""
    import torch

    from attar.data import load_data
    from attar.distill.cls_store import DEFAULT_SHARD_ROWS, dump_classifier_teacher
    from attar.models import build_model, load_model

    dspec = _data_spec(data, train_limit=train_limit)
    bundle = load_data(dspec)
    if spec.artifact:
        teacher, info = load_model(spec.artifact)
        if tuple(info.get("input_shape") or ()) != tuple(bundle.input_shape):
            raise AttarError(f"--model {name} takes inputs of shape {tuple(info['input_shape'])}, --data {data} has "
                             f"{tuple(bundle.input_shape)}.")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            teacher = build_model(spec, bundle.input_shape, len(bundle.classes), mean=bundle.mean, std=bundle.std)
    desc = f"{bundle.name}: {dspec.model_dump_json(exclude_defaults=True)}, {len(bundle.train)} training rows"
    store = dump_classifier_teacher(teacher, bundle.train.x, out_dir, k=k, temperature=temperature, step=step,
                                    values=values, classes=bundle.classes, teacher_name=name, data=desc,
                                    shard_rows=shard_rows or DEFAULT_SHARD_ROWS, batch_size=batch_size,
                                    overwrite=overwrite, progress=None if not quiet else False)
    m = store.manifest
    out.print(f"teacher store {out_dir}: {m.settings.rows} examples of {bundle.name}, top-{m.settings.k} of "
              f"{m.settings.vocab_size} classes ({values}), {m.bytes / 2**10:.1f} KiB ({store.bytes_per_position:.1f} "
              f"bytes/example) in {len(m.shards)} shards; read it with teacher: {{store: {out_dir}}}", markup=False)


def _text_spec(data: str, **fields):
    """``--data`` (a name/path or a YAML mapping of the lm stage's data block) with the flags that were given."""
    from pydantic import ValidationError

    from attar.distill.lm_config import LMTextSpec
    from attar.registry import validation_error

    block: dict
    if data.strip().startswith("{"):
        try:
            block = yaml.safe_load(data)
        except yaml.YAMLError as e:
            raise AttarError(f"--data {data!r}: not a valid YAML mapping ({e}).") from None
        if not isinstance(block, dict):
            raise AttarError(f"--data {data!r}: expected a mapping such as '{{name: fortunes, max_len: 64}}'.")
    else:
        block = {"name": data}
    block |= {k: v for k, v in fields.items() if v is not None and v is not False}
    try:
        return LMTextSpec(**block)
    except ValidationError as e:
        raise validation_error("--data", e, LMTextSpec) from None


@app.command("dump")
@errors_as_messages
def dump_cli(
    model: str = typer.Option(..., "--model", "-m", help="the teacher: a packaged model name (attar models list), "
                              "a Hugging Face causal-LM folder, or an image/table classifier (a model artifact or "
                              "run stage folder, a packaged classifier, or a model spec as YAML)"),
    data: str = typer.Option(..., "--data", "-d", help="a built-in text set or text file, or the lm stage's data "
                             "block as YAML: '{name: fortunes, max_len: 64, train_limit: 400}'; for a classifier an "
                             "image/table data spec: 'digits', '{name: fashion-mnist, train_limit: 2000}', "
                             "'{artifact: CONDENSED_DIR}'"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="the store's folder (resumed when it holds an unfinished "
                                 "dump with the same settings)"),
    k: Optional[int] = typer.Option(None, "--k", min=1, help="top-k log-probs kept per token (default 32) or per "
                                    "example (default: every class)"),
    temperature: float = typer.Option(1.0, "--temperature", min=1e-6, help="the KD temperature the store is for"),
    step: float = typer.Option(1 / 16, "--step", min=1e-4, max=1.0, help="log-prob quantisation step in nats (each "
                               "stored log-prob within this of the teacher's)"),
    values: str = typer.Option("q8", "--values", help="q8: one byte per log-prob (within --step); f32: float32, "
                               "exact (classifier stores: KD equal to the live teacher's at k = classes)"),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="tokens per row (overrides the data block)"),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="prompt tokens per row (never scored)"),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="training rows kept"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="text field/column of a file"),
    pack: bool = typer.Option(False, "--pack", help="packed text (the data block's pack: true)"),
    seed: int = typer.Option(0, "--seed", help="the recipe's seed (it decides which texts are validation rows)"),
    shard_rows: Optional[int] = typer.Option(None, "--shard-rows", min=1, help="rows per shard, the unit of resume "
                                             "and reading (default 128 for LMs, 4096 for classifiers)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="rows per teacher forward pass"),
    home: Optional[Path] = typer.Option(None, "--home", help="where the token store of --pack lives (default "
                                        "$ATTAR_HOME or ./runs), as for attar run"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a store made with other settings"),
    student_tokenizer: Optional[str] = typer.Option(
        None, "--student-tokenizer", help="the student's tokenizer when it is not the teacher's (a packaged model "
        "name or a folder): the rows are the student's, each read by the teacher in its own tokens, and the store "
        "holds the positions that pair with scored student positions (cross-tokenizer KD; the recipe's teacher "
        "then is {store: OUT, tokenizer: MODEL})"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Run a teacher once over a corpus's training rows and store its top-k per token."""
    from attar.train.progress import is_quiet, start_command

    start_command(quiet, threads)
    if values not in ("q8", "f32"):
        raise AttarError(f"--values must be q8 or f32, got {values!r}.")
    cls_spec = _classifier_model(model)
    if cls_spec is not None:
        _dump_classifier(*cls_spec, data, out_dir, k=k, temperature=temperature, step=step, values=values,
                         train_limit=train_limit, shard_rows=shard_rows, batch_size=batch_size, overwrite=overwrite,
                         quiet=quiet)
        return
    if values != "q8":
        raise AttarError("--values f32 is for classifier stores; an LM store keeps its log-probs as one byte each "
                         "(--step sets their precision).")
    k = 32 if k is None else k
    shard_rows = 128 if shard_rows is None else shard_rows
    spec = _text_spec(data, max_len=max_len, prompt_len=prompt_len, train_limit=train_limit, text_column=text_column,
                      pack=pack)
    from attar.distill.lm_store import dump_lm_teacher
    from attar.paths import home as home_of
    from attar.stages.lm import load_tokenizer, stage_data
    from attar.text.lm_io import lm_context, scored_vocab
    from attar.text.pretrained_lm import load_pretrained_lm
    from attar.text.token_store import tokenizer_fingerprint

    folder = Path(model).expanduser()
    teacher, tok = load_pretrained_lm({"hf": str(folder)} if folder.is_dir() else {"pretrained": model})
    ctx = lm_context(teacher)
    log = None if (quiet or is_quiet()) else (lambda m: typer.echo(m, err=True))
    stok = load_tokenizer(student_tokenizer, "--student-tokenizer") if student_tokenizer else tok
    rows = stage_data(spec, stok, [ctx] if ctx else [], seed, home_of(home) / "cache", log)
    desc = (f"{spec.name}: max_len {spec.max_len}" + (" packed" if spec.pack else f", prompt_len {spec.prompt_len}")
            + (f", train_limit {spec.train_limit}" if spec.train_limit else "") + f", seed {seed}, {len(rows.train)} rows")
    split, pad = rows.train, rows.pad_id
    if student_tokenizer:  # the student's rows, in the teacher's tokens (attar.distill.lm_cross_tokenizer)
        from attar.distill.lm_cross_tokenizer import CrossTokenizer

        cross = CrossTokenizer("uld", stok, tok, len(stok), scored_vocab(teacher, tok) or len(tok))
        split, pad = cross.teacher_rows(rows.train), cross.teacher_pad
        desc += f", read by the teacher from {student_tokenizer}'s rows"
    store = dump_lm_teacher(teacher, split, out_dir, pad_id=pad, k=k, temperature=temperature, step=step,
                            vocab_size=scored_vocab(teacher, tok) or len(tok), teacher_name=model,
                            tokenizer=tokenizer_fingerprint(tok), data=desc, shard_rows=shard_rows,
                            batch_size=batch_size, overwrite=overwrite, progress=None if not quiet else False)
    m = store.manifest
    out.print(f"teacher store {out_dir}: {m.settings.rows} rows, {m.positions:,} tokens, top-{k} of "
              f"{m.settings.vocab_size}, {m.bytes / 2**20:.2f} MiB ({store.bytes_per_position:.1f} bytes/token) in "
              f"{len(m.shards)} shards", markup=False)


@app.command("relabel")
@errors_as_messages
def relabel_cli(
    artifact: Path = typer.Argument(..., help="a condensed set (attar condense --out, or runs/<id>/<stage>/data)"),
    store_dir: Path = typer.Option(..., "--store", "-s", help="a classifier store dumped on this condensed set "
                                   "(attar teacher dump --data '{artifact: CONDENSED}')"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="write the relabelled set here (default: replace "
                                           "the artifact in place)"),
) -> None:
    """Give a condensed set's rows the soft labels a stored teacher pass holds (condense evaluate reads them)."""
    from attar.distill.cls_store import relabel_condensed

    dest = relabel_condensed(artifact, store_dir, out_dir)
    out.print(f"{dest}: soft labels from teacher store {store_dir}; attar condense evaluate {dest} scores them",
              markup=False)


@app.command("show")
@errors_as_messages
def show_cli(store_dir: Path = typer.Argument(..., help="a store written by attar teacher dump")) -> None:
    """What a store holds; every shard's size and sha256 are checked."""
    from attar.data.teacher_store import TeacherStore

    st = TeacherStore.open(store_dir)
    s, m = st.settings, st.manifest
    unit = "examples" if s.kind == "classifier" else "tokens"
    vals = "float32" if s.values == "f32" else f"step {s.step:g} nats"
    out.print(f"{store_dir}: {s.kind} teacher {s.teacher or '?'} (weights {s.teacher_hash}), top-{s.k} of {s.vocab_size}, "
              f"T={s.temperature:g}, {vals}\n  data: {s.data} (hash {s.data_hash})\n  {s.rows} rows, "
              f"{m.positions:,} {unit}, {m.bytes:,} bytes in {len(m.shards)} shards: {st.bytes_per_position:.1f} "
              f"bytes/{unit[:-1]}; all shards intact", markup=False)


@app.command("serve")
@errors_as_messages
def serve_cli(
    model: str = typer.Option(..., "--model", "-m", help="the teacher: a packaged model name, a Hugging Face causal-LM "
                              "folder, or an earlier run's model (runs/<id>/<stage>)"),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="TCP port (0: any free one, printed)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (the default: this machine only)"),
    topk: int = typer.Option(256, "--topk", min=1, help="the largest k a client may ask for"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda"),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16 (the teacher's weights)"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Serve a causal LM's top-k log-probabilities for given token ids over HTTP (Ctrl-C stops it)."""
    from attar.train.progress import start_command

    if device not in ("auto", "cpu", "cuda") or dtype not in ("float32", "bfloat16"):
        raise AttarError(f"--device must be auto, cpu or cuda and --dtype float32 or bfloat16 (got {device}, {dtype}).")
    start_command(True, threads)
    from attar.distill.lm_serve import serve_model

    try:
        server = serve_model(model, host=host, port=port, max_topk=topk, device=device, dtype=dtype)
    except OSError as e:
        raise AttarError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port.") from None
    info = server.info()
    out.print(f"serving {model} ({info['vocab_size']} tokens, tokenizer {info['tokenizer'][:12]}, top-k up to {topk}) "
              f"at {server.url}; recipes read it with teacher: {{url: {server.url}}}. Ctrl-C stops.", markup=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
