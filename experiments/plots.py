"""The experiments' figures, saved as PNG: a heatmap, line plots in panels and grouped bars.

Values may be ``None`` (a metric a run did not compute): they are drawn as gaps, never as 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests

import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
import numpy as np  # noqa: E402

from locft_jax.hosts import is_primary  # noqa: E402

Values = Sequence[float | None]


def _array(values: Values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    if is_primary():  # multi-host: process 0 writes the run's files
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(
    path: str | Path,
    values: Sequence[Values],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    colorbar_label: str = "",
    percent: bool = False,
) -> Path:
    """``values[row][col]`` as a coloured grid with each cell's number written in it."""
    grid = np.array([_array(row) for row in values])
    shown = grid * 100 if percent else grid
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * max(len(col_labels), 4), 1.4 + 0.5 * max(len(row_labels), 3)))
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for (r, c), v in np.ndenumerate(shown):
        if np.isfinite(v):
            dark = image.norm(v) < 0.5  # viridis is dark at the low end: white text there, black above
            ax.text(c, r, f"{v:.0f}" if percent else f"{v:.4g}", ha="center", va="center", fontsize=7,
                    color="w" if dark else "k")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=colorbar_label + (" (%)" if percent else ""))
    return _save(fig, path)


def line_panels(
    path: str | Path,
    x: Values,
    panels: Mapping[str, Mapping[str, Values]],
    xlabel: str,
    title: str,
    log_x: bool = False,
    fractions: Sequence[str] = (),
) -> Path:
    """One panel per ``panels`` key (its y label), one line per series in it, all over ``x``.

    Panels named in ``fractions`` hold scores in [0, 1] and keep that y range, so a flat 0 or 1
    reads as what it is.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    xs = _array(x)
    for ax, (ylabel, series) in zip(axes[0], panels.items(), strict=True):
        for name, ys in series.items():
            ax.plot(xs, _array(ys), marker="o", label=name)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.minorticks_off()
        if ylabel in fractions:
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def grouped_bars(
    path: str | Path, groups: Sequence[str], series: Mapping[str, Values], ylabel: str, title: str,
    fraction: bool = False,
) -> Path:
    """Bars of each series side by side within each group (e.g. methods × metrics); ``fraction``:
    the values are scores in [0, 1], and the axis shows all of that range."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(groups), 3.6))
    width = 0.8 / max(len(series), 1)
    for k, (name, ys) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width, _array(ys), width,
               label=name)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right", fontsize=8)
    if fraction:
        ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
