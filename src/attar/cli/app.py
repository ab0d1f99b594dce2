"""The Typer app every command module registers on, and what they share."""

from __future__ import annotations

from typing import Any, Optional

import typer
import yaml
from rich.console import Console

from attar.errors import AttarError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="attar: distill, condense, merge and adapt models.")
out = Console()
THREADS_HELP = "torch CPU threads (default: $OMP_NUM_THREADS, else one core left free on machines with <= 4 cores)"


def start_long_command(threads: Optional[int], quiet: bool) -> None:
    """Thread count and progress mode, once, before a command that trains or condenses."""
    from attar.train.progress import start_command

    start_command(quiet, threads)


def parse_sets(sets: list[str] | None) -> dict[str, Any]:
    """The one convention for a method's fields on the command line: ``--set FIELD=VALUE`` (repeatable).

    ``["rank=16", "targets=[query, value]"]`` -> ``{"rank": 16, "targets": ["query", "value"]}`` (YAML values)."""
    outd: dict[str, Any] = {}
    for s in sets or []:
        if "=" not in s:
            raise AttarError(f"--set {s!r}: expected FIELD=VALUE, e.g. --set rank=16")
        k, v = s.split("=", 1)
        try:
            outd[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise AttarError(f"--set {s!r}: the value is not valid YAML ({e})") from None
    return outd
