"""How long a learned condensation runs: ``iterations``, a wall-time ``budget``, or the paper's schedule.

The papers' schedules (DM: 20,000 iterations, DC: 1,000 of 10 x 50 inner steps, MTT: 5,000) are GPU
schedules: DM's took 3 hours on 2 CPU cores for digits at IPC 10. So, on a CPU, a call that gives
neither ``iterations`` nor ``budget`` runs under :data:`CPU_BUDGET_S` of wall time and says it is a
CPU budget; ``paper_schedule`` restores the paper's count. A budget is checked between iterations and
stops the loop when the next iteration would not fit (by the mean time of those done), so the run ends
within it; at least one iteration always runs. Given both, ``iterations`` and ``budget`` both bind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from attar.errors import AttarError

#: wall-time budget of a learned method on a CPU when the caller gives neither iterations nor a budget
CPU_BUDGET_S = 300.0

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_budget(value: str | float | int | None, field: str = "budget") -> float | None:
    """Seconds from ``"10m"``, ``"90s"``, ``"1h30m"``, ``"2.5h"`` or a number of seconds; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise AttarError(f"{field} must be a duration like 10m, 90s or 1h30m, got {value!r}.")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"((?:\d+(?:\.\d+)?[smh])+|\d+(?:\.\d+)?)", text)
        if not parts:
            raise AttarError(f"{field} must be a duration like 10m, 90s or 1h30m (s, m, h), got {value!r}.")
        if text[-1].isdigit():
            seconds = float(text)
        else:
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", text))
    if not seconds > 0 or seconds == float("inf"):
        raise AttarError(f"{field} must be a positive duration, got {value!r}.")
    return seconds


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")


@dataclass(frozen=True)
class Schedule:
    """``iterations``: the most the loop runs; ``budget_s``: wall seconds (None: no limit); ``source``: who chose."""

    iterations: int
    budget_s: float | None
    source: str  # "iterations", "budget", "paper", "cpu default", "selection"
    paper_iterations: int

    def describe(self) -> str:
        """One line said before work starts: what bounds the run and how to change it."""
        if self.source == "selection":
            return "selects real rows: one pass, no iterations"
        paper = f"the paper's schedule is {self.paper_iterations} iterations"
        if self.source == "cpu default":
            return (f"CPU budget: at most {fmt_duration(self.budget_s)} of wall time (up to {self.iterations} iterations; "
                    f"{paper}: --paper-schedule, or choose --iterations N / --budget 30m)")
        if self.source == "paper":
            return f"paper schedule: {self.iterations} iterations" + self._cap()
        if self.source == "budget":
            return f"wall-time budget {fmt_duration(self.budget_s)} (up to {self.iterations} iterations; {paper})"
        return f"{self.iterations} iterations" + self._cap()

    def _cap(self) -> str:
        return f", stopped earlier by the wall-time budget of {fmt_duration(self.budget_s)}" if self.budget_s else ""

    def meta(self) -> dict:
        return {"iterations_planned": self.iterations, "budget_seconds": self.budget_s, "schedule": self.source,
                "paper_iterations": self.paper_iterations}


def plan_schedule(learns_images: bool, paper_iterations: int, iterations: int | None = None,
                  budget: str | float | None = None, paper_schedule: bool = False,
                  device_type: str = "cpu") -> Schedule:
    """The schedule of one condensation call (see the module doc); errors name the option and the fix."""
    budget_s = parse_budget(budget)
    if not learns_images:
        return Schedule(1, None, "selection", 0)
    if iterations is not None and (isinstance(iterations, bool) or iterations < 1):
        raise AttarError(f"iterations must be >= 1, got {iterations!r}.")
    if paper_schedule and iterations is not None:
        raise AttarError(f"give one of iterations ({iterations}) and paper_schedule (the paper's {paper_iterations}).")
    if iterations is not None:
        return Schedule(int(iterations), budget_s, "iterations", paper_iterations)
    if paper_schedule:
        return Schedule(paper_iterations, budget_s, "paper", paper_iterations)
    if budget_s is not None:
        return Schedule(paper_iterations, budget_s, "budget", paper_iterations)
    if device_type == "cpu":
        return Schedule(paper_iterations, CPU_BUDGET_S, "cpu default", paper_iterations)
    return Schedule(paper_iterations, None, "paper", paper_iterations)
