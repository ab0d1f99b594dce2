"""A live progress bar (rich) with loss, throughput and ETA; silent when not a terminal or under CI."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_enabled() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    if os.environ.get("ATTAR_PROGRESS") == "0":
        return False
    return sys.stderr.isatty()


class StepProgress:
    """Context manager: ``update(n, **fields)`` advances the bar and shows the fields."""

    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool | None = None):
        self.enabled = progress_enabled() if enabled is None else enabled
        self.description = description
        self.total = total
        self.completed = completed
        self._progress: Progress | None = None

    def __enter__(self) -> "StepProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed, info="")
        return self

    def update(self, advance: int = 1, **fields: float | str) -> None:
        if self._progress is not None:
            info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            self._progress.update(self._task, advance=advance, info=info)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
