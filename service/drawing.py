"""SVG figures of the pages' plot data, drawn by matplotlib (the optional `ui` extra).

Each call builds its own `Figure` and never touches pyplot or the global rcParams, so drawings
on several worker threads at once do not interfere. Called on a worker thread: a contour map
is tens of milliseconds of CPU.
"""

from __future__ import annotations

import io
from html import escape
from typing import Any

import numpy as np

# Colours of the pages' stylesheet, so figures and text look like one page.
INK, MUTED, GRID = "#1d2433", "#5b6478", "#e3e7ef"
SERIES = ("#2358c8", "#c2410c", "#15803d")


def available() -> bool:
    """Whether matplotlib is installed (checked per call, so a test can hide it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained", facecolor="white")


def _tidy(ax: Any) -> None:
    ax.set_facecolor("white")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(MUTED)
    ax.tick_params(colors=MUTED, labelsize=8.5)
    ax.xaxis.label.set_color(INK)
    ax.yaxis.label.set_color(INK)


def _svg(fig: Any, title: str) -> bytes:
    fig.suptitle(title, color=INK, fontsize=11, fontweight="bold")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Title": title, "Date": None})
    svg = buffer.getvalue().decode()
    # An SVG's own <title> names it for assistive technology and for anyone opening the file.
    opened = svg.index(">", svg.index("<svg")) + 1
    return (svg[:opened] + f"\n <title>{escape(title)}</title>" + svg[opened:]).encode()


def direction(data: dict[str, Any], title: str) -> bytes:
    fig = _figure(7.2, 6.0)
    axes = fig.subplots(3, 1, sharex=True)
    t = data["t"]
    rows = (
        ("f", "f(x + t·v)"),
        ("df", "d/dt f(x + t·v)"),
        ("d2f", "d²/dt² f(x + t·v)"),
    )
    for ax, (key, label), colour in zip(axes, rows, SERIES, strict=True):
        _tidy(ax)
        ax.grid(True, color=GRID, linewidth=0.8)
        ax.axvline(0, color=MUTED, linewidth=0.8, linestyle=":")
        ax.axhline(0, color=GRID, linewidth=1.0)
        ax.plot(t, data[key], color=colour, linewidth=1.8)
        ax.plot([0], [np.interp(0, t, data[key])], "o", color=colour, markersize=4)
        ax.set_ylabel(label, fontsize=9)
    axes[-1].set_xlabel("t  (distance along the unit direction v; the point is t = 0)", fontsize=9)
    return _svg(fig, title)


def contour(data: dict[str, Any], title: str, labels: tuple[str, str]) -> bytes:
    fig = _figure(6.4, 5.6)
    ax = fig.subplots()
    _tidy(ax)
    x, y = data["x"], data["y"]
    f = np.ma.masked_invalid(np.asarray(data["f"], np.float64))
    filled = ax.contourf(x, y, f, levels=24, cmap="viridis")
    ax.contour(x, y, f, levels=12, colors="white", linewidths=0.5, alpha=0.6)
    colorbar = fig.colorbar(filled, ax=ax, shrink=0.9)
    colorbar.ax.tick_params(labelsize=8, colors=MUTED)
    colorbar.set_label("f", color=INK)
    # Arrows show the gradient's direction only: magnitudes can span many orders.
    step = max(1, -(-len(x) // 12))  # about 12 arrows a side
    gx, gy = data["grad_x"][::step, ::step], data["grad_y"][::step, ::step]
    norm = np.hypot(gx, gy)
    with np.errstate(invalid="ignore", divide="ignore"):
        u, v = np.where(norm > 0, gx / norm, 0), np.where(norm > 0, gy / norm, 0)
    xx, yy = np.meshgrid(x[::step], y[::step])
    ax.quiver(xx, yy, u, v, color="white", alpha=0.85, width=0.004, scale=22, pivot="mid")
    ax.plot(*data["variables"], marker="o", color="#ef4444", markeredgecolor="white", markersize=7)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    return _svg(fig, title)


def _heat(fig: Any, ax: Any, matrix: np.ndarray) -> None:
    from matplotlib.ticker import MaxNLocator

    _tidy(ax)
    m = np.asarray(matrix, np.float64)
    finite = np.abs(m[np.isfinite(m)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(
        m, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest"
    )
    colorbar = fig.colorbar(image, ax=ax, shrink=0.9)
    colorbar.ax.tick_params(labelsize=8, colors=MUTED)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if m.size <= 64:  # small enough to print each entry in its cell
        for (row, col), value in np.ndenumerate(m):
            ax.text(
                col,
                row,
                f"{value:.3g}",
                ha="center",
                va="center",
                fontsize=7.5,
                color="white" if abs(value) > 0.6 * bound else INK,
            )


def _input_ticks(ax: Any, names: list[tuple[str, int]], rows: bool = False) -> None:
    """Label each input argument's block of columns (and rows), with a rule between blocks."""
    if sum(size for _, size in names) <= 12:  # few variables: name each one
        names = [(n if size == 1 else f"{n}[{i}]", 1) for n, size in names for i in range(size)]
    starts = np.cumsum([0] + [size for _, size in names])
    centres = [a + (size - 1) / 2 for a, (_, size) in zip(starts, names, strict=False)]
    labels = [name for name, _ in names]
    if len(names) <= 12:
        ax.set_xticks(centres, labels, fontsize=8.5)
        if rows:
            ax.set_yticks(centres, labels, fontsize=8.5)
    for edge in starts[1:-1] if len(names) < 12 and max(s for _, s in names) > 1 else ():
        ax.axvline(edge - 0.5, color=INK, linewidth=0.8)
        if rows:
            ax.axhline(edge - 0.5, color=INK, linewidth=0.8)


def jacobian(data: dict[str, Any], title: str, names: list[tuple[str, int]]) -> bytes:
    j = data["jacobian"]
    fig = _figure(7.2, min(6.5, 2.6 + 0.18 * j.shape[0]))
    ax = fig.subplots()
    _heat(fig, ax, j)
    _input_ticks(ax, names)
    ax.set_xlabel("input variable")
    ax.set_ylabel("output element")
    return _svg(fig, title)


def hessian(data: dict[str, Any], title: str, names: list[tuple[str, int]]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    h, eigenvalues = data["hessian"], data["eigenvalues"]
    fig = _figure(7.2, 4.6)
    heat, spectrum = fig.subplots(1, 2, width_ratios=(1.5, 1))
    _heat(fig, heat, h)
    heat.set_aspect("equal")
    _input_ticks(heat, names, rows=True)
    heat.set_title("H = ∇²f at the point", fontsize=9.5, color=INK)
    _tidy(spectrum)
    spectrum.grid(True, color=GRID, linewidth=0.8)
    spectrum.axhline(0, color=MUTED, linewidth=0.8)
    index = np.arange(1, len(eigenvalues) + 1)
    colours = np.where(eigenvalues < 0, SERIES[1], SERIES[0])
    spectrum.vlines(index, 0, eigenvalues, colors=colours, linewidth=1.2)
    spectrum.scatter(index, eigenvalues, c=colours, s=16, zorder=3)
    spectrum.xaxis.set_major_locator(MaxNLocator(integer=True))
    spectrum.set_xlabel("eigenvalue index (ascending)")
    spectrum.set_title("eigenvalues of H", fontsize=9.5, color=INK)
    return _svg(fig, title)
