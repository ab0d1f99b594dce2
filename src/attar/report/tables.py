"""Results tables as Markdown, HTML and rich, with one formatting rule per column.

Why one place: the report, `attar runs show` and `attar runs compare` must print
the same number the same way (accuracy as a percentage, sizes in KB/MB, '—' for
a value that was not measured rather than a misleading 0).

A results row is a plain dict. Known keys, each optional: ``model``, ``stage``
(names), ``accuracy`` (fraction in [0, 1]), ``nll`` (nats), ``ece``, and the keys
:func:`attar.models.model_size` returns: ``params``, ``bytes``, ``latency_ms_b1``,
``latency_ms_b256`` (any ``latency_ms_b{N}`` formats as a latency). A merge's ``accuracy[S]`` (accuracy on
source S's test split) formats as an accuracy, ``forgetting[S]`` and ``forgetting`` (S's own accuracy minus
the merge's, and their mean) in percentage points. ``size_bytes``,
``latency_b1_ms`` and ``latency_b256_ms`` are accepted as aliases. Any other key
(e.g. ``teacher``) becomes an extra column after these, in order of first appearance.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Callable, Iterable, Sequence

MISSING = "—"


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v == ""


def human_bytes(n: float) -> str:
    """Decimal units (1 KB = 1000 B), matching the labels."""
    n = float(n)
    if abs(n) < 1e3:
        return f"{n:.0f} B"
    if abs(n) < 1e6:
        return f"{n / 1e3:.1f} KB"
    if abs(n) < 1e9:
        return f"{n / 1e6:.2f} MB"
    return f"{n / 1e9:.2f} GB"


def human_count(n: float) -> str:
    """Exact below a million (small models differ in the last digits), compact above."""
    n = float(n)
    if abs(n) < 1e6:
        return f"{n:,.0f}"
    if abs(n) < 1e9:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e9:.2f}B"


def _ms(v: float) -> str:
    v = float(v)
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"


def _generic(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# key -> (header, formatter)
COLUMNS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "stage": ("stage", str),
    "model": ("model", str),
    "accuracy": ("accuracy", lambda v: f"{100 * float(v):.2f}%"),
    "nll": ("NLL", lambda v: f"{float(v):.4f}"),
    "ece": ("ECE", lambda v: f"{float(v):.4f}"),
    "params": ("params", human_count),
    "trainable_params": ("trainable params", human_count),
    "bytes": ("size", human_bytes),
    "latency_ms_b1": ("latency b1 (ms)", _ms),
    "latency_ms_b256": ("latency b256 (ms)", _ms),
}
ALIASES = {"size_bytes": "bytes", "latency_b1_ms": "latency_ms_b1", "latency_b256_ms": "latency_ms_b256"}
#: Always shown (as '—' when unmeasured) so tables from different runs line up.
ALWAYS = ("accuracy", "nll", "ece", "params", "bytes", "latency_ms_b1", "latency_ms_b256")
_LATENCY = re.compile(r"latency_ms_b(\d+)$")
_PER_SOURCE = re.compile(r"(accuracy|forgetting)\[(.+)\]$")


def _pp(v: float) -> str:
    return f"{100 * float(v):+.2f} pp"


def _spec(key: str) -> tuple[str, Callable[[Any], str]]:
    key = ALIASES.get(key, key)
    if key in COLUMNS:
        return COLUMNS[key]
    m = _LATENCY.match(key)
    if m:
        return f"latency b{m.group(1)} (ms)", _ms
    m = _PER_SOURCE.match(key)
    if m:
        return f"{m.group(1)} on {m.group(2)}", (COLUMNS["accuracy"][1] if m.group(1) == "accuracy" else _pp)
    if key == "forgetting":
        return "forgetting (mean)", _pp
    return key, _generic


def format_cell(key: str, value: Any) -> str:
    if _is_missing(value):
        return MISSING
    try:
        return _spec(key)[1](value)
    except (TypeError, ValueError):
        return str(value)


def _canonical(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for alias, key in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            out.setdefault(key, value)
    return out


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Name columns present in any row, the standard metric columns, then extra keys in first-seen order."""
    present: dict[str, None] = {}
    for r in rows:
        present.update(dict.fromkeys(_canonical(r)))
    names = [k for k in ("stage", "model") if k in present] or ["model"]
    extra = [k for k in present if k not in ("stage", "model") and k not in ALWAYS]
    return names + list(ALWAYS) + extra


def header(key: str) -> str:
    return _spec(key)[0]


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, formatted cells, and which columns are numeric (right-aligned in HTML)."""
    cols = table_columns(rows)
    canon = [_canonical(r) for r in rows]

    def numeric(c: str) -> bool:
        vals = [r.get(c) for r in canon if not _is_missing(r.get(c))]
        return c in ALWAYS or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)

    cells = [[format_cell(c, r.get(c)) for c in cols] for r in canon]
    return [header(c) for c in cols], cells, [c not in ("stage", "model") and numeric(c) for c in cols]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    heads, body, _ = table_cells(rows)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(esc(h) for h in heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def html_table(rows: Sequence[dict[str, Any]]) -> str:
    heads, body, num = table_cells(rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    trs = "".join(
        "<tr>" + "".join(f'<td class="{"num" if n else "txt"}">{html.escape(c)}</td>' for c, n in zip(r, num)) + "</tr>\n"
        for r in body
    )
    return f"<table>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{trs}</tbody>\n</table>\n"


# ---------------------------------------------------------------- run comparison


def higher_is_better(metric: str) -> bool | None:
    """Direction of improvement guessed from the metric name; None when unknown (no colour)."""
    m = metric.lower()
    if "forgetting" in m:
        return False
    if any(w in m for w in ("loss", "nll", "ece", "latency", "time", "bytes", "size", "params", "error", "perplexity")):
        return False
    if any(w in m for w in ("acc", "f1", "auc", "precision", "recall", "score")):
        return True
    return None


def _leaf(metric: str) -> str:
    """``val/accuracy``, ``test_accuracy``, ``eval.nll`` -> the bare metric name."""
    leaf = metric.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    for prefix in ("train_", "val_", "test_", "eval_"):
        if leaf.startswith(prefix):
            return leaf[len(prefix):]
    return leaf


def format_metric(metric: str, value: Any) -> str:
    """Format a store metric by its name (``val/accuracy`` formats like ``accuracy``)."""
    leaf = _leaf(metric)
    if leaf not in ("stage", "model") and _spec(leaf)[1] is not _generic:
        return format_cell(leaf, value)
    if leaf.endswith("accuracy") or leaf.endswith("acc"):
        return format_cell("accuracy", value)
    return format_cell(metric, value)


def format_delta(metric: str, delta: float | None) -> str:
    if _is_missing(delta):
        return MISSING
    leaf = _leaf(metric)
    if leaf.endswith("accuracy") or leaf.endswith("acc"):
        return f"{100 * delta:+.2f} pp"
    return f"{delta:+.4g}"


def render_compare_table(rows: Iterable[Sequence[Any]], run_a: str, run_b: str, title: str | None = None):
    """A rich Table of ``(stage, metric, a, b, delta)`` rows (from ``RunStore.compare``); deltas
    are green when they improve on run A and red when they regress."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title or f"{run_a} → {run_b}"))
    table.add_column("stage")
    table.add_column("metric")
    table.add_column(f"A {run_a}", justify="right")
    table.add_column(f"B {run_b}", justify="right")
    table.add_column("Δ (B − A)", justify="right")
    for stage, metric, a, b, delta in rows:
        style = ""
        better = higher_is_better(metric)
        if better is not None and not _is_missing(delta) and delta != 0:
            style = "green" if (delta > 0) == better else "red"
        d = format_delta(metric, delta)
        table.add_row(
            escape(str(stage)), escape(metric), format_metric(metric, a), format_metric(metric, b), f"[{style}]{d}[/]" if style else d
        )
    return table
