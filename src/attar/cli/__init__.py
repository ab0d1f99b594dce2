"""The ``attar`` command: one package, one module per command group. Commands parse arguments, load things
and call the library; the method packages hold no Typer code. Every user mistake is one paragraph on stderr
and exit code 2 (``attar.console``)."""

from __future__ import annotations

import sys

import typer

from attar.cli.app import app
from attar.console import fail as _fail
from attar.errors import AttarError

from attar.cli import run, methods, data, models, runs  # noqa: E402,F401,I001  (registration, in help order)


def _mount_merge() -> None:
    import functools

    from attar.cli.merge import merge_cli

    @functools.wraps(merge_cli)
    def merge(*args, **kwargs):
        try:
            merge_cli(*args, **kwargs)
        except AttarError as e:
            _fail(e)

    app.command("merge", help="Merge models named in a mergekit-style YAML config (see docs/merge.md).")(merge)


def _mount_subapps() -> None:
    from attar.cli.condense import app as condense_app
    from attar.cli.finetune import app as finetune_app
    from attar.cli.lm import app as lm_app
    from attar.cli.select import app as select_app
    from attar.cli.teacher import app as teacher_app

    app.add_typer(condense_app, name="condense")
    app.add_typer(finetune_app, name="finetune")
    app.add_typer(lm_app, name="lm")
    app.add_typer(select_app, name="select")
    app.add_typer(teacher_app, name="teacher")


_mount_merge()
_mount_subapps()


def main() -> None:
    """The ``attar`` command: the Typer app, with file-system refusals on a user's paths (an --out under a
    file, a read-only folder, a full disk) printed as one paragraph, whatever command hit them."""
    from attar.console import path_error

    try:
        app()
    except OSError as e:
        msg = path_error(e)
        if msg is None:
            raise
        try:
            _fail(msg)
        except typer.Exit as ex:
            sys.exit(ex.exit_code)


__all__ = ["app", "main"]
