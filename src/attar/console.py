"""How every command prints a user's mistake: one paragraph on stderr, exit code 2, no traceback."""

from __future__ import annotations

import functools
from typing import Any, Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from attar.errors import AttarError

err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def fail(e: Exception) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)  # a message may hold [brackets]
    raise typer.Exit(2)


def errors_as_messages(fn: F) -> F:
    """Wrap a Typer command so an ``AttarError`` becomes :func:`fail`'s paragraph."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttarError as e:
            fail(e)

    return wrapper  # type: ignore[return-value]
