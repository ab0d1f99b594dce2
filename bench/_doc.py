"""Replace one marked section of a Markdown file, so several bench scripts can share one document."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path


def replace_section(path: str | Path, key: str, body: str, title: str) -> None:
    path = Path(path)
    start, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else f"# {title}\n\n"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text)


def ms(v: list[float], scale: float = 100.0, nd: int = 2) -> str:
    """``mean ± sample std`` of ``v`` times ``scale`` (— when empty)."""
    if not v:
        return "—"
    m = statistics.mean(v) * scale
    s = statistics.stdev(v) * scale if len(v) > 1 else 0.0
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def verdict(method: list[float], base: list[float]) -> str:
    """better / worse when the mean difference exceeds the larger seed-to-seed std, else no gain."""
    if len(method) < 2 or len(base) < 2:
        return "—"
    d = statistics.mean(method) - statistics.mean(base)
    tol = max(statistics.stdev(method), statistics.stdev(base))
    return "better" if d > tol else ("worse" if d < -tol else "no gain")


def read_results(path: Path, key: str) -> dict[tuple[str, int], dict]:
    """Rows of a bench's ``results.jsonl`` made with configuration ``key``, by (arm, seed): what a rerun can skip."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["config"] == key:
                done[(r["arm"], r["seed"])] = r
    return done


def peer_venv(path: Path, peer: str, probe: str | None = None) -> Path:
    """A peer tool's own venv (never attar's dependencies), made when missing or when ``probe`` (Python code that
    exits non-zero) says it is not ready: the local CPU torch first, or pip pulls CUDA wheels, then ``peer``."""
    py = path / "bin" / "python"
    ready = py.exists() and (probe is None or subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0)
    if not ready:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + [peer], check=True)
    return py
