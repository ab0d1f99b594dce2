"""``attar finetune``: the command-line face of :func:`attar.adapt.finetune`.

``app`` is a Typer sub-app (mount it with ``app.add_typer(app, name="finetune")``):

* ``attar finetune run MODEL --data tweets --adapter lora --set rank=16 --set init=pissa --out DIR``
* ``attar finetune run --config finetune.yaml --out DIR`` (a :class:`~attar.adapt.api.FinetuneSpec` as YAML)
* ``attar methods adapters [NAME]``: the registered adapters, or one adapter's fields
* ``attar finetune data``: the built-in text data sets
* ``attar finetune apply-peft BASE ADAPTER --out DIR``: merge a PEFT LoRA adapter into its base, save a HF folder

``finetune_cli`` is the ``run`` command as a plain function, for mounting as a single command
(``app.command("finetune")(finetune_cli)``). Every ``AttarError`` is printed as one paragraph (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from attar.cli.app import THREADS_HELP, parse_sets
from attar.console import errors_as_messages as _errors_as_messages
from attar.errors import AttarError
from attar.paths import check_out_dir
from attar.registry import validation_error
from attar.train.config import FINETUNE_TRAIN

app = typer.Typer(help="Fine-tune Hugging Face text classifiers with adapters (LoRA, SSF, HFT, LIFT, masks, MeZO).",
                  add_completion=False, no_args_is_help=True)
out = Console()


def data_spec_from_arg(data: str, **extra: Any) -> dict[str, Any]:
    """``tweets`` / ``fortunes`` (built-in), ``file.csv``, ``file.parquet`` or a ``datasets`` folder."""
    from attar.text.sources import TEXT_BUILTINS

    extra = {k: v for k, v in extra.items() if v is not None}
    if data in TEXT_BUILTINS:
        return {"name": data} | extra
    p = Path(data).expanduser()
    if p.is_dir():
        return {"hf_disk": str(p)} | extra
    if p.suffix.lower() == ".csv":
        return {"csv": str(p)} | extra
    if p.suffix.lower() in (".parquet", ".pq"):
        return {"parquet": str(p)} | extra
    raise AttarError(
        f"--data {data!r} is neither a built-in text data set ({', '.join(TEXT_BUILTINS.names())}), a .csv or .parquet "
        "file, nor a folder written by datasets' save_to_disk."
    )


@_errors_as_messages
def finetune_cli(
    model: Optional[str] = typer.Argument(None, help="local Hugging Face folder or alias (minilm)"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="tweets | fortunes | file.csv | file.parquet | datasets folder"),
    adapter: Optional[str] = typer.Option(None, "--adapter", "-a", help="full, head, lora (default), ssf, hft, lift, magnitude"),
    sets: Optional[List[str]] = typer.Option(None, "--set", help="adapter field, e.g. --set rank=16 --set init=pissa"),
    text_column: Optional[str] = typer.Option(None, help="text column (files)"),
    label_column: Optional[str] = typer.Option(None, help="label column (files)"),
    classes: Optional[List[str]] = typer.Option(None, "--class", help="keep only these classes (repeat)"),
    max_length: Optional[int] = typer.Option(None, help="tokens per text (default 128)"),
    train_limit: Optional[int] = typer.Option(None, help="training rows kept (seeded, stratified)"),
    test_limit: Optional[int] = typer.Option(None, help="test rows kept (same for every seed)"),
    epochs: Optional[int] = typer.Option(None, help=f"default {FINETUNE_TRAIN['epochs']}"),
    batch_size: Optional[int] = typer.Option(None, help=f"default {FINETUNE_TRAIN['batch_size']}"),
    lr: Optional[float] = typer.Option(None, help=f"default {FINETUNE_TRAIN['lr']}"),
    seed: Optional[int] = typer.Option(None, help="seeds the splits, the new head, data order and dropout (default 0)"),
    optimizer: Optional[str] = typer.Option(None, help="backprop (default) | mezo"),
    mezo_eps: Optional[float] = typer.Option(None, help="MeZO perturbation scale (default 1e-3)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="a FinetuneSpec as YAML"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output folder: model/, adapter/, metrics.json"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoints in --out"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, lines or summary"),
) -> None:
    """Fine-tune MODEL on text data with an adapter; writes a Hugging Face folder (and a PEFT adapter for LoRA)."""
    from attar.adapt.api import FinetuneSpec, finetune_spec
    from attar.train.progress import start_command

    start_command(quiet, threads)

    if config is not None:
        try:
            raw = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            raise AttarError(f"{config}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise AttarError(f"{config}: a finetune config is a mapping (model, data, adapter, train, ...)")
    else:
        raw = {}
    if model is not None:
        raw["model"] = model
    if data is not None:
        raw["data"] = data_spec_from_arg(data, text_column=text_column, label_column=label_column, max_length=max_length,
                                         train_limit=train_limit, test_limit=test_limit, classes=classes or None)
    elif isinstance(raw.get("data"), str):
        raw["data"] = data_spec_from_arg(raw["data"])
    if "model" not in raw or "data" not in raw:
        raise AttarError("give a MODEL and --data (or a --config naming both), e.g. `attar finetune run minilm --data tweets --out out/`")
    ad = raw.get("adapter", "lora")
    ad = {"name": ad} if isinstance(ad, str) else dict(ad)
    if adapter is not None and adapter != ad.get("name"):
        ad = {"name": adapter}
    raw["adapter"] = ad | parse_sets(sets)
    train = FINETUNE_TRAIN | dict(raw.get("train") or {})
    for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if v is not None:
            train[k] = v
    raw["train"] = train
    for k, v in (("seed", seed), ("optimizer", optimizer)):
        if v is not None:
            raw[k] = v
    if mezo_eps is not None:
        raw["mezo"] = {"eps": mezo_eps}
    try:
        spec = FinetuneSpec.model_validate(raw)
    except ValidationError as e:
        raise validation_error("invalid finetune settings", e) from None
    check_out_dir(out_dir)
    res = finetune_spec(spec, out_dir, resume=resume)
    m = res.metrics
    out.print(
        f"{spec.adapter.get('name') if isinstance(spec.adapter, dict) else spec.adapter}: test accuracy {m['test_accuracy']:.4f}, "
        f"trainable {m['trainable_params']:,} of {m['total_params']:,} ({100 * m['trainable_params'] / m['total_params']:.2f}%), "
        f"{m['train_seconds']:.0f}s -> {out_dir}/model" + (f" (PEFT adapter: {m['adapter_dir']})" if m.get("adapter_dir") else "")
    )


@_errors_as_messages
def data_cli() -> None:
    """The built-in text data sets and whether each is installed."""
    from attar.text.sources import list_text_datasets

    t = Table("name", "available", "description", "install")
    for d in list_text_datasets():
        t.add_row(d["name"], "yes" if d["available"] else "[red]no[/]", d["description"], "" if d["available"] else d["install"])
    out.print(t)


@_errors_as_messages
def apply_peft_cli(
    base: str = typer.Argument(..., help="base model folder (or alias)"),
    adapter: Path = typer.Argument(..., exists=True, file_okay=False, help="PEFT LoRA adapter folder"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="output Hugging Face folder"),
) -> None:
    """Merge a PEFT LoRA adapter into its base and save the result as a Hugging Face folder."""
    from attar.adapt import import_peft, merge_adapters
    from attar.adapt.peft_format import adapter_classes
    from attar.text.hf import load_hf_classifier, save_hf_classifier

    model = load_hf_classifier(base, classes=adapter_classes(adapter))
    merge_adapters(import_peft(model, adapter))
    save_hf_classifier(model, out_dir)
    out.print(f"merged {adapter} into {base} -> {out_dir}")


app.command("run")(finetune_cli)
app.command("data")(data_cli)
app.command("apply-peft")(apply_peft_cli)
