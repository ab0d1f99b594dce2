"""How many CPU threads torch uses, chosen once when a long command starts.

Why: torch's intra-op pool spins OpenMP threads that wait on each other at every parallel region.
With one thread per core on a small machine, a single competing process (another job, an editor's
indexer) stalls every region: the quickstart took 3 minutes idle on 2 cores and 22 minutes beside one
busy process. Leaving a core free on small machines costs little when idle and avoids that cliff.

Order: an explicit ``--threads N``, else ``OMP_NUM_THREADS`` (torch already honours it; torchrun sets
it to 1 per worker), else on a machine with at most ``SMALL`` usable cores one fewer than the cores
(at least 1), else torch's own default. Usable cores are the process's CPU affinity, capped by a
cgroup v2 CPU quota when one is set (containers).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

from attar.errors import AttarError

SMALL = 4  # at most this many usable cores: leave one free


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _parse_omp(value: str) -> int:
    # OMP_NUM_THREADS may be a list ("4,2") for nested levels; the first entry is the outer pool
    first = value.split(",")[0].strip()
    try:
        n = int(first)
    except ValueError:
        n = 0
    if n < 1:
        raise AttarError(f"OMP_NUM_THREADS={value!r} is not a positive whole number; set it to e.g. 1, "
                         "or unset it to let attar choose.")
    return n


def choose_threads(explicit: int | None = None, env: Mapping[str, str] | None = None,
                   cores: int | None = None) -> tuple[int | None, str]:
    """``(threads, why)``; ``threads`` is ``None`` when torch's default should stand (a large machine)."""
    env = os.environ if env is None else env
    if explicit is not None:
        if explicit < 1:
            raise AttarError(f"--threads {explicit}: give a positive number of threads (e.g. --threads 1).")
        return int(explicit), "--threads"
    if env.get("OMP_NUM_THREADS", "").strip():
        return _parse_omp(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = usable_cores() if cores is None else cores
    if cores <= SMALL:
        return max(1, cores - 1), f"{cores} usable cores: one left free"
    return None, f"{cores} usable cores: torch's default"


def apply_threads(explicit: int | None = None) -> int:
    """Choose (:func:`choose_threads`) and set torch's intra-op thread count; returns the count in use.

    Called once at the start of a long command, never at import (a library user keeps their own setting).
    """
    import torch

    n, _why = choose_threads(explicit)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
