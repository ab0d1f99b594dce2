"""``attar merge CONFIG --out DIR``: the command-line face of the merge engine.

``merge_command`` is a plain function (for the pipeline and tests); ``merge_cli`` is the same with Typer
annotations, mounted on the main app as ``attar merge``. Errors are ``AttarError``s; the main CLI prints them
as a paragraph. ``attar methods merge`` lists the methods.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:  # pragma: no cover
    from attar.merge.engine import MergeResult

DEFAULT_SHARD_SIZE = "5GB"  # attar.merge.engine's; repeated so `attar --help` does not load torch (tested)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's timeout) raises KeyboardInterrupt, so the temp output folder is removed as on Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt("terminated (SIGTERM)")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def merge_command(
    config: Path,
    out: Path,
    dtype: str | None = None,
    shard_size: str | int | None = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    quiet: bool = False,
) -> "MergeResult":
    """Run the merge described by ``config`` into ``out`` and print a one-line summary (plus notes)."""
    from attar.merge.engine import run_merge  # torch: only when a merge runs

    console = Console(stderr=True, quiet=quiet, highlight=False)
    with _sigterm_as_interrupt():
        result = run_merge(config, out, dtype=dtype, shard_size=shard_size, overwrite=overwrite, progress=False if quiet else None)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(
        f"merged {len(result.inputs)} model(s) with {result.method}: {result.tensors} tensors, "
        f"{result.bytes / 1e6:.1f} MB in {result.shards} shard(s), {result.seconds:.1f}s -> {result.out}"
    )
    return result




def merge_cli(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="merge config YAML (mergekit format)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (written atomically)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype: float32, float16, bfloat16"),
    shard_size: str = typer.Option(DEFAULT_SHARD_SIZE, "--max-shard-size", help="largest output shard, e.g. 5GB"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar, progress lines or summary"),
) -> None:
    """Merge the models named in CONFIG and write the result to --out."""
    merge_command(config, out, dtype=dtype, shard_size=shard_size, overwrite=overwrite, quiet=quiet)

