"""Plots logged to MLflow as PNG artifacts, drawn headless (matplotlib's Agg canvas, no pyplot:
nothing global changes and no display is needed)."""

from __future__ import annotations

from pathlib import Path

#: Every plot is this many pixels: (width, height).
SIZE_PX = (800, 500)
_DPI = 100


def curves(
    path: str | Path,
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
) -> Path:
    """One line per series (label -> [(x, y), ...], or [(x, y, sd), ...] for error bars) in one
    PNG at `path`. The x axis has whole-number ticks (steps, epochs), or a log scale with
    `log_x` (fractions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(SIZE_PX[0] / _DPI, SIZE_PX[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points in series.items():
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        marker = "o" if len(xs) <= 30 else None
        if points and all(len(p) == 3 for p in points):
            ax.errorbar(xs, ys, yerr=[p[2] for p in points], label=label, marker=marker, capsize=3)
        else:
            ax.plot(xs, ys, label=label, marker=marker)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)  # no bbox="tight": the PNG is exactly SIZE_PX
    return Path(path)
