"""Shared output helpers for layer × position results: matplotlib heatmaps (Agg canvas, no global
backend state) and CSV tables."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import torch


def short_label(text: str, width: int = 10) -> str:
    """A token as a readable tick label: escaped whitespace, cut to `width` characters."""
    s = text.replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= width else s[: width - 1] + "…"


def write_csv(rows: Sequence[dict], path: str | Path) -> None:
    """One CSV row per dict; the first row's keys are the header."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def heatmap(values: torch.Tensor, path: str | Path, *, row_labels: Sequence[str], col_labels: Sequence[str],
            title: str = "", cbar_label: str = "", cmap: str = "viridis", vmin: float | None = None,
            vmax: float | None = None, center: float | None = None, annotations: Sequence[Sequence[str]] | None = None,
            xlabel: str = "position", ylabel: str = "layer") -> Path:
    """Write a `[rows, cols]` heatmap PNG, row 0 at the bottom; optional text in each cell.

    `center` makes the colour scale symmetric around that value (for diverging colour maps)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = values.detach().float().cpu().numpy()
    n_rows, n_cols = data.shape
    if center is not None:
        span = max(abs(float(data.max()) - center), abs(float(data.min()) - center), 1e-9)
        vmin, vmax = center - span, center + span
    fig = Figure(figsize=(min(2.0 + 0.75 * n_cols, 40), min(1.5 + 0.28 * n_rows, 40)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([short_label(c) for c in col_labels], rotation=60, ha="right", fontsize=8)
    step = max(1, n_rows // 40)
    ax.set_yticks(range(0, n_rows, step))
    ax.set_yticklabels([row_labels[i] for i in range(0, n_rows, step)], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=cbar_label)
    if annotations is not None and n_rows * n_cols <= 2500:
        for r in range(n_rows):
            for c in range(n_cols):
                red, green, blue, _ = im.cmap(im.norm(data[r, c]))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(c, r, short_label(annotations[r][c], 8), ha="center", va="center", fontsize=5,
                        color="white" if dark else "black")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
