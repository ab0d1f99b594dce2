"""How every command prints a user's mistake: one paragraph on stderr, exit code 2, no traceback."""

from __future__ import annotations

import errno
import functools
from typing import Any, Callable, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from attar.errors import AttarError

err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def fail(e: Exception) -> NoReturn:
    # soft_wrap: no newlines inserted at 80 columns off a terminal, so a logged message stays greppable
    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # it may hold [brackets]
    raise typer.Exit(2)


#: File-system refusals caused by the paths a user chose (an --out under a file, a read-only folder, a full
#: disk): worth a paragraph, not a traceback. Other OSErrors may be attar's bugs and keep their traceback.
USER_PATH_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                    errno.ENAMETOOLONG}


def path_error(e: OSError) -> AttarError | None:
    """The one-paragraph form of a file-system refusal on a user's path, or None for other errors."""
    if e.errno not in USER_PATH_ERRNOS:
        return None
    where = f" {e.filename}" if e.filename else ""
    hint = {
        errno.EEXIST: "a file is in the way where a folder must be created (is a parent of this path a file?)",
        errno.ENOTDIR: "this path or one of its parents is a file, not a folder",
        errno.EISDIR: "a folder is in the way where a file must be written",
        errno.ENOSPC: "the disk is full; files are written to temporary names first, so nothing was replaced",
    }.get(e.errno, "you lack permission to write there")
    return AttarError(f"cannot write{where}: {e.strerror} ({hint}). Choose another path (--out, --home or "
                      "ATTAR_HOME) or fix the one given, then run the command again.")


def errors_as_messages(fn: F) -> F:
    """Wrap a Typer command so an ``AttarError`` becomes :func:`fail`'s paragraph (file-system refusals are
    turned into one by the ``attar`` entry point, :func:`attar.cli.main`, for every command)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttarError as e:
            fail(e)

    return wrapper  # type: ignore[return-value]
