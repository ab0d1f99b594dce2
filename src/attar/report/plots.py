"""The two report figures, drawn with matplotlib's object API on the Agg canvas.

Why no pyplot: pyplot keeps global state and may pick an interactive backend;
a bare ``Figure`` renders headless, is thread-safe and leaves the user's
matplotlib settings alone. Figures are small (≈100 dpi) so a report takes well under a second.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

from attar.report._files import atomic_write

Curves = dict[str, dict[str, list[tuple[int, float]]]]

LOSS_KEYS = ("train/loss", "train_loss", "loss")
ACC_KEYS = ("val/accuracy", "val_accuracy", "val/acc", "val_acc")


def pick_key(keys: Sequence[str], preferred: Sequence[str], contains: Sequence[str], avoid: str | None = None) -> str | None:
    """The first preferred key present, else the first key containing all of ``contains`` (and not ``avoid``)."""
    for k in preferred:
        if k in keys:
            return k
    for k in sorted(keys):
        low = k.lower()
        if all(c in low for c in contains) and (avoid is None or avoid not in low):
            return k
    return None


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, buf.getvalue())
    return path


def plot_learning_curves(
    curves: Curves, path: str | Path, loss_key: str | None = None, acc_key: str | None = None
) -> Path | None:
    """Training loss (left) and validation accuracy (right) against step, one line per stage.

    Keys are guessed per stage (``train/loss``/``loss``…, ``val/accuracy``/``val_acc``…) unless
    given. Returns None, writing nothing, when no stage has either curve.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    drawn = 0
    for stage, metrics in curves.items():
        keys = list(metrics)
        lk = loss_key if loss_key in metrics else pick_key(keys, LOSS_KEYS, ("loss",), avoid="val")
        ak = acc_key if acc_key in metrics else pick_key(keys, ACC_KEYS, ("val", "acc"))
        for ax, key in ((ax_loss, lk), (ax_acc, ak)):
            pts = metrics.get(key) if key else None
            if not pts:
                continue
            steps, values = zip(*pts)
            ax.plot(steps, values, marker="o" if len(pts) < 30 else None, markersize=3, label=stage)
            drawn += 1
    if not drawn:
        return None
    for ax, what in ((ax_loss, "training loss"), (ax_acc, "validation accuracy")):
        ax.set_xlabel("step")
        ax.set_title(what)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(fig, Path(path))


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_accuracy_vs_params(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Accuracy against parameter count (log x), each point labelled: the size/quality trade-off at a glance.

    Returns None, writing nothing, when no row has both a positive ``params`` and an ``accuracy``.
    """
    pts = []
    for r in rows:
        p, a = _num(r.get("params")), _num(r.get("accuracy"))
        if p is not None and p > 0 and a is not None:
            pts.append((p, 100 * a, str(r.get("model") or r.get("stage") or "")))
    if not pts:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.scatter([p for p, _, _ in pts], [a for _, a, _ in pts], zorder=3)
    for p, a, label in pts:
        ax.annotate(label, (p, a), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set_xscale("log")
    if len({p for p, _, _ in pts}) == 1:  # a single x would give a zero-width log axis
        p = pts[0][0]
        ax.set_xlim(p / 3, p * 3)
    ax.set_xlabel("parameters")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs parameters")
    ax.margins(x=0.15, y=0.1)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
