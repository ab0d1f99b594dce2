"""A condensed set (or any image data) as a PNG grid, one row per class."""

from __future__ import annotations

from pathlib import Path

import torch

from attar.data.artifact import SyntheticSet, load_synthetic
from attar.errors import AttarError


def render_grid(artifact: str | Path | SyntheticSet, png: str | Path, max_per_class: int = 10) -> Path:
    """Save the condensed images as a PNG grid: one row per class, up to ``max_per_class`` columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = artifact if isinstance(artifact, SyntheticSet) else load_synthetic(artifact)
    if s.x.dim() != 4:
        raise AttarError("render_grid needs image data [N, C, H, W].")
    classes = s.meta.get("classes") or [str(c) for c in range(int(s.y.max()) + 1)]
    per = [torch.nonzero(s.y == c).flatten()[:max_per_class] for c in range(len(classes))]
    cols = max(1, max(len(p) for p in per))
    rows = len(classes)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 1.4, rows * 0.9 + 0.4), squeeze=False)
    for r, idx in enumerate(per):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c < len(idx):
                img = s.x[idx[c]].clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
            if c == 0:
                ax.set_ylabel(str(classes[r])[:12], rotation=0, ha="right", va="center", fontsize=8)
    title = f"{s.meta.get('method', '?')} ipc {s.meta.get('ipc', '?')} — {s.meta.get('data_name', '')}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
