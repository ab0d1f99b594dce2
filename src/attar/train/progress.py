"""Progress of every long loop (training, condensation, teacher passes, LM training): one module, one check.

Three modes, decided once per loop by :func:`progress_mode`:

* ``bar``: a live rich bar with loss, throughput and ETA, when stderr is a terminal;
* ``lines``: when stderr is not a terminal (a log file, a pipe) or ``CI`` is set, a plain line every
  ``interval`` seconds (default 30, ``ATTAR_PROGRESS_INTERVAL``) or every 5% of the work, whichever is
  later, and a summary line at the end. Why: a bar is invisible there, and a silent job looks the same as
  a hung one for hours; and a run of hours should not fill its log with a line every 30 s;
* ``off``: ``--quiet`` (:func:`set_quiet`), ``ATTAR_PROGRESS=0``, ``enabled=False``, or a DDP rank other
  than 0 (one voice per job).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

from attar.threads import apply_threads
from attar.train import distributed as dist

_quiet = False
DEFAULT_INTERVAL = 30.0
#: in lines mode, at least this share of the work between two lines (with ``interval`` > 0)
MIN_FRACTION = 0.05


def set_quiet(flag: bool) -> None:
    """``--quiet``: silence every progress bar, line and summary of this process (commands call it at start)."""
    global _quiet
    _quiet = bool(flag)


def start_command(quiet: bool = False, threads: int | None = None) -> None:
    """What every long command does once before any work: apply ``--quiet`` and choose torch's thread
    count (:func:`attar.threads.apply_threads`: ``--threads``, ``OMP_NUM_THREADS``, or a core left free)."""
    set_quiet(quiet)
    apply_threads(threads)


def is_quiet() -> bool:
    return _quiet or os.environ.get("ATTAR_PROGRESS") == "0"


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def progress_mode(stream: TextIO | None = None, enabled: bool | None = None) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for a loop writing to ``stream`` (default stderr)."""
    if enabled is False or is_quiet():
        return "off"

    if not dist.is_main():
        return "off"
    stream = sys.stderr if stream is None else stream
    return "lines" if _ci() or not _isatty(stream) else "bar"


def progress_enabled() -> bool:
    """Whether a live bar would show (kept for callers that only draw bars)."""
    return progress_mode() == "bar"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("ATTAR_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def fmt_seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fields(fields: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


class StepProgress:
    """Context manager: ``update(n, **fields)`` advances by ``n`` units and shows the latest fields.

    ``enabled``: ``False`` is silent; ``None`` or ``True`` let :func:`progress_mode` decide (quiet always
    wins). ``stream``, ``interval`` (seconds between lines, and at least ``MIN_FRACTION`` of the work
    between them; 0 = a line per update) and ``clock`` are injectable (tests; a log-friendly cadence);
    ``unit`` names what is counted. ``budget_s``: a wall-time budget that may end the loop before
    ``total`` (a condensation ``--budget``): the share done and the ETA then count whichever of the two
    ends it first.
    """

    def __init__(self, description: str, total: int, completed: int = 0, enabled: bool | None = None, *,
                 unit: str = "steps", stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, budget_s: float | None = None):
        self.description, self.total, self.completed, self.unit = description, int(total), int(completed), unit
        self.budget_s = budget_s
        self._last_fraction = 0.0
        self._stream = stream
        self.mode = progress_mode(stream, enabled)
        self.enabled = self.mode != "off"
        self.interval = _interval() if interval is None else float(interval)
        self.clock = clock
        self.fields: dict = {}
        self._progress = None
        self._start_completed = self.completed

    @property
    def stream(self) -> TextIO:
        return sys.stderr if self._stream is None else self._stream  # resolved late: test runners swap stderr

    def __enter__(self) -> "StepProgress":
        self._t0 = self._last = self.clock()
        self._last_fraction = self.fraction(self._t0) or 0.0
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=self.total, completed=self.completed, info="")
        return self

    def update(self, advance: int = 1, **fields: float | str) -> None:
        self.completed += int(advance)
        if fields:
            self.fields = fields
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, info=_fields(fields))
        elif self.mode == "lines":
            now = self.clock()
            frac = self.fraction(now)
            due = now - self._last >= self.interval
            if due and self.interval > 0 and frac is not None:
                due = frac - self._last_fraction >= MIN_FRACTION - 1e-12
            if due:
                self._last, self._last_fraction = now, frac or 0.0
                self._line(self._status(now))

    def fraction(self, now: float) -> float | None:
        """Share of the work done (the larger of the steps' and the wall budget's); None without a total."""
        parts = [self.completed / self.total] if self.total > 0 else []
        if self.budget_s:
            parts.append((now - self._t0) / self.budget_s)
        return min(1.0, max(parts)) if parts else None

    def eta(self, now: float) -> float | None:
        """Seconds left: by the rate so far, capped by what is left of the wall budget."""
        elapsed = now - self._t0
        done = self.completed - self._start_completed
        left = []
        if done > 0 and self.total > self.completed:
            left.append(elapsed / done * (self.total - self.completed))
        if self.budget_s:
            left.append(max(0.0, self.budget_s - elapsed))
        return min(left) if left else None

    def _status(self, now: float) -> str:
        elapsed = now - self._t0
        pct = f" ({100.0 * self.completed / self.total:.0f}%)" if self.total > 0 else ""
        left = self.eta(now)
        eta = f"  eta {fmt_seconds(left)}" if left is not None else ""
        info = _fields(self.fields)
        return (f"{self.description}: {self.completed}/{self.total} {self.unit}{pct}" + (f"  {info}" if info else "")
                + f"  elapsed {fmt_seconds(elapsed)}{eta}")

    def _line(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not kill a run
            pass

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif self.mode == "lines":
            now = self.clock()
            info = _fields(self.fields)
            how = "done" if exc_type is None else f"stopped ({exc_type.__name__})"
            self._line(f"{self.description}: {how}, {self.completed}/{self.total} {self.unit} in "
                       f"{fmt_seconds(now - self._t0)}" + (f"  {info}" if info else ""))
