"""The quickstart's wall time, idle and beside one CPU-burning process, for attar's thread choice and the old one.

Why: with one torch thread per core, OpenMP threads wait on each other whenever another process holds a
core; the quickstart took ~3 minutes idle on a 2-core machine and ~22 with one competitor. attar now
chooses the thread count (attar.threads: ``--threads``, ``OMP_NUM_THREADS``, else one core left free on
machines with <= 4 cores). Each cell is one ``attar run`` of the built-in quickstart in a fresh process,
``CI=true`` (plain progress lines), a fresh ``ATTAR_HOME``; the competitor is a Python busy loop started
just before the run and stopped right after it. Writes a table to docs/benchmarks.md. Run:

    .venv/bin/python bench/quickstart_threads.py [--repeats 1] [--old-threads 2] [--dry-run]

``--dry-run`` prints the plan (commands and thread counts) without running anything.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _doc import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATTAR = [sys.executable, "-m", "attar.cli"]
BURN = [sys.executable, "-c", "while True: pass"]


def settings(old_threads: int) -> list[tuple[str, list[str]]]:
    """(label, extra `attar run` arguments): attar's own choice, and the old fixed thread count."""
    from attar.threads import choose_threads

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    n, why = choose_threads(None, env=env)
    return [(f"attar's choice ({n if n is not None else 'torch default'}: {why})", []),
            (f"old: {old_threads} threads", ["--threads", str(old_threads)])]


def run_once(extra: list[str], competitor: bool) -> float:
    home = Path(tempfile.mkdtemp(prefix="attar-bench-threads-"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"CI": "true", "ATTAR_HOME": str(home)}
    burner = subprocess.Popen(BURN) if competitor else None
    try:
        t = time.perf_counter()
        subprocess.run([*ATTAR, "run", *extra], env=env, check=True, cwd=home, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        took = time.perf_counter() - t
        for report in home.glob("*/report.md"):  # the run's own numbers, so a thread change that moves them shows
            print("\n".join(ln for ln in report.read_text().splitlines() if ln.startswith("| ")), flush=True)
        return took
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        shutil.rmtree(home, ignore_errors=True)


def _min(s: float) -> str:
    return f"{s / 60:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell (the median is reported)")
    ap.add_argument("--old-threads", type=int, default=2, help="the fixed thread count to compare with")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--no-doc", action="store_true", help="print the table, do not write docs/benchmarks.md")
    a = ap.parse_args()
    plan = settings(a.old_threads)
    if a.dry_run:
        for label, extra in plan:
            for competitor in (False, True):
                print(f"{label:<60} {'with competitor' if competitor else 'idle':<16} "
                      f"{' '.join(['attar', 'run', *extra])}" + (f"  +  {' '.join(BURN[1:])}" if competitor else ""))
        return
    import torch

    from attar.threads import usable_cores

    rows = []
    for label, extra in plan:
        idle = [run_once(extra, False) for _ in range(a.repeats)]
        busy = [run_once(extra, True) for _ in range(a.repeats)]
        rows.append((label, statistics.median(idle), statistics.median(busy)))
        print(f"{label}: idle {_min(rows[-1][1])} min, with a competitor {_min(rows[-1][2])} min", flush=True)
    table = ["| threads | idle (min) | beside one busy process (min) | slowdown |", "|---|---|---|---|"]
    table += [f"| {label} | {_min(i)} | {_min(b)} | {b / i:.1f}x |" for label, i, b in rows]
    body = "\n".join([
        "## Quickstart wall time: thread choice, idle and beside a competing process",
        "",
        f"`attar run` (built-in quickstart, `CI=true`), {usable_cores()} usable cores, {platform.machine()}, "
        f"torch {torch.__version__}, median of {a.repeats} run(s) per cell. The competing process is a Python busy "
        "loop (one core). attar's choice: `--threads`, else `OMP_NUM_THREADS`, else one core left free on machines "
        "with at most 4 cores (see README, attar.threads).",
        "",
        *table,
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')}. Reproduce: `.venv/bin/python bench/quickstart_threads.py`",
    ])
    print(body)
    if not a.no_doc:
        replace_section(ROOT / "docs" / "benchmarks.md", "quickstart-threads", body, "Benchmarks")


if __name__ == "__main__":
    main()
