"""``report.md`` and ``report.html`` for a run: the results table, two figures and notes.

Why both: Markdown reads well in a terminal, a pull request or a docs page; the
HTML file opens in any browser with no server. The HTML is self-contained
(inline CSS) and refers to the PNGs by relative path, so the run folder can be
copied or zipped whole and still render.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Sequence

from attar.report._files import atomic_write
from attar.report.plots import Curves, plot_accuracy_vs_params, plot_learning_curves
from attar.report.tables import html_table, markdown_table

_LATENCY_KEY = re.compile(r"latency_(ms_b\d+|b\d+_ms)$")
#: Added to the notes of any report with a latency column: what the number is, so one slow row is not misread.
LATENCY_NOTE = ("Latency (ms) is the median of repeated timed forward passes (random inputs, eval mode, the model's "
                "device) after a warm-up, at the batch size in the column header; it reflects this machine and its "
                "load at the time (attar.models.model_size).")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.3rem 0.6rem; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafbfc; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
li { margin: 0.2rem 0; }
"""


def write_report(
    run_dir: str | Path,
    title: str,
    rows: Sequence[dict[str, Any]],
    curves: Curves,
    notes: Sequence[str] = (),
    *,
    loss_key: str | None = None,
    acc_key: str | None = None,
) -> dict[str, Path]:
    """Write the report files into ``run_dir``; returns ``{"markdown", "html"[, "learning_curves",
    "accuracy_vs_params"]: path}`` (a figure is left out when there is nothing to plot).

    ``rows`` follow :mod:`attar.report.tables`; ``curves`` is ``{stage: {metric: [(step, value)]}}``
    as :meth:`attar.store.RunStore.curves` returns it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(_LATENCY_KEY.match(str(k)) and v is not None for r in rows for k, v in r.items()):
        notes = [*notes, LATENCY_NOTE]
    paths: dict[str, Path] = {}
    figures: list[tuple[str, str]] = []
    lc = plot_learning_curves(curves, run_dir / "learning_curves.png", loss_key=loss_key, acc_key=acc_key)
    if lc is not None:
        paths["learning_curves"] = lc
        figures.append(("Learning curves", lc.name))
    ap = plot_accuracy_vs_params(rows, run_dir / "accuracy_vs_params.png")
    if ap is not None:
        paths["accuracy_vs_params"] = ap
        figures.append(("Accuracy vs parameters", ap.name))

    md = [f"# {title}", "", "## Results", ""]
    md.append(markdown_table(rows) if rows else "_No results._\n")
    for caption, name in figures:
        md += [f"## {caption}", "", f"![{caption}]({name})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    paths["markdown"] = run_dir / "report.md"
    atomic_write(paths["markdown"], "\n".join(md).encode())

    e = html.escape
    body = [f"<h1>{e(title)}</h1>", "<h2>Results</h2>", html_table(rows) if rows else "<p><em>No results.</em></p>"]
    for caption, name in figures:
        body += [f"<h2>{e(caption)}</h2>", f'<img src="{e(name)}" alt="{e(caption)}">']
    if notes:
        body += ["<h2>Notes</h2>", "<ul>"] + [f"<li>{e(n)}</li>" for n in notes] + ["</ul>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    paths["html"] = run_dir / "report.html"
    atomic_write(paths["html"], page.encode())
    return paths
