"""``attar select``: data selection outside a training stage.

``app`` is a Typer sub-app (mount it with ``app.add_typer(select_app, name="select")``):

* ``attar select grape DATA --model DIR --out FILE``: keep, per prompt, the candidate response the target
  model finds most likely (GRAPE; :func:`attar.select.grape.grape_select`). ``DATA`` is a .jsonl/.json/.csv of
  prompts with candidate responses; ``FILE`` (.jsonl/.json/.csv) gets one ``prompt, response`` row per prompt.
Every ``AttarError`` is printed as one paragraph (exit 2). The training-stage selectors are listed by
``attar methods selectors``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from attar.cli.app import THREADS_HELP
from attar.console import errors_as_messages as _errors_as_messages
from attar.errors import AttarError

app = typer.Typer(help="Data selection: GRAPE response selection for fine-tuning data; the training-stage selectors.",
                  add_completion=False, no_args_is_help=True)
out = Console()


@_errors_as_messages
def grape_cli(
    data: Path = typer.Argument(..., help="prompts with candidate responses: .jsonl / .json / .csv (see docs/select.md)"),
    model: Path = typer.Option(..., "--model", "-m", help="target model: a local Hugging Face causal-LM folder"),
    out_file: Path = typer.Option(..., "--out", "-o", help="kept pairs: .jsonl (with all scores), .json or .csv"),
    normalize: str = typer.Option("mean", help="mean (per-token log-likelihood, default) | sum"),
    eos: bool = typer.Option(False, "--eos", help="also score the end-of-sequence token after each response"),
    chat_template: bool = typer.Option(False, "--chat-template", help="wrap prompts in the tokenizer's chat template"),
    batch_size: int = typer.Option(8, help="sequences per forward"),
    max_length: int = typer.Option(1024, help="tokens per prompt + response (longer: the prompt's start is cut)"),
    prompt_column: str = typer.Option("prompt", help="prompt column / key"),
    response_column: Optional[str] = typer.Option(None, help="response column / key (default: responses, response, "
                                                             "or response_1, response_2, ...)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda if available)"),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Keep, per prompt, the candidate response the target model finds most likely (GRAPE)."""
    import torch

    from attar.select.grape import grape_select, load_causal_lm
    from attar.threads import apply_threads

    apply_threads(threads)

    if normalize not in ("mean", "sum"):
        raise AttarError(f"--normalize {normalize!r}: choose mean or sum.")
    lm, tok = load_causal_lm(model)
    lm.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    res = grape_select(data, lm, tok, normalize=normalize, eos=eos, chat_template=chat_template,  # type: ignore[arg-type]
                       batch_size=batch_size, max_length=max_length, prompt_column=prompt_column,
                       response_column=response_column)
    path = res.write(out_file)
    s = res.stats
    changed = sum(1 for r in res.rows if r["chosen"] != 0)
    out.print(f"kept {len(res.rows)} of {int(s['candidates'])} responses ({int(s['prompts'])} prompts; the first "
              f"candidate was not the most likely for {changed}) -> {path}")
    out.print(f"cost: {int(s.get('scoring_forward_rows', 0))} scoring forwards, {int(s.get('scoring_tokens', 0))} tokens, "
              f"{s['select_seconds']:.1f} s" + (f"; {int(s['truncated'])} sequences cut to {max_length} tokens"
                                                  if s.get("truncated") else ""))


@app.callback()
def _group() -> None:
    """Data selection: GRAPE picks fine-tuning responses (`attar select grape`); the training-stage selectors are
    listed by `attar methods selectors`."""


app.command("grape")(grape_cli)
