"""Square layers × layers overlap heatmaps for `saeforge align-layers` (analysis/plots.py draws
layer × position grids with token labels; these are square, on one 0..1 scale, side by side)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

_LAYER = re.compile(r"^layers\.(\d+)\.")


def short(label: str) -> str:
    """`layers.12.resid_post` → `12`; anything else unchanged."""
    m = _LAYER.match(label)
    return m.group(1) if m else label


def overlap_figure(panels: Sequence[tuple[str, torch.Tensor]], labels_a: Sequence[str], labels_b: Sequence[str],
                   path: str | Path, xlabel: str = "layer j", ylabel: str = "layer i", suptitle: str = "") -> Path:
    """One PNG with a heatmap per (title, matrix [Ua, Ub]) panel, row 0 at the bottom, shared 0..1 scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ua, ub = len(labels_a), len(labels_b)
    side = min(max(3.0, 0.16 * max(ua, ub)), 9.0)
    fig = Figure(figsize=(side * len(panels) + 1.2, side * ua / max(ua, ub) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    step_a, step_b = max(1, ua // 15), max(1, ub // 15)
    for ax, (title, m) in zip(axes, panels):
        im = ax.imshow(m.detach().float().cpu().numpy(), origin="lower", vmin=0.0, vmax=1.0, cmap="viridis",
                       interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(0, ub, step_b), [short(labels_b[j]) for j in range(0, ub, step_b)], fontsize=7)
        ax.set_yticks(range(0, ua, step_a), [short(labels_a[i]) for i in range(0, ua, step_a)], fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    assert im is not None, "no panels to draw"
    fig.colorbar(im, ax=list(axes), label="overlap of top inputs", shrink=0.9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
