"""Charts without matplotlib: what a run's curves show, the colours of a confusion matrix, and
simple inline SVG (line charts, a heat map, a stacked bar) for `mmkit report`.

Shared by every picture of a run: `curve_panels` says which curves a history has and how they are
labelled (eval --plot's matplotlib figure and the report's SVG draw the same panels),
`blues`/`text_colour_for` colour a confusion matrix (the report's heat map, the TensorBoard image
where matplotlib is missing) the way matplotlib's "Blues" does in eval --plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

# matplotlib's "Blues" colour map at 9 evenly spaced points (ColorBrewer), light to dark
BLUES_ANCHORS = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
# the "tab10" colours in eval --plot's order: blue, orange, green, purple, then the rest
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@dataclass(frozen=True)
class Series:
    label: str
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    dashed: bool = False
    colour: int | None = None  # PALETTE index; None: the panel's next colour


@dataclass(frozen=True)
class Panel:
    title: str
    y_label: str
    series: tuple[Series, ...]
    y_range: tuple[float, float] | None = None  # None: from the data
    first_colour: int = 0  # PALETTE index of the first series: the run's curves never share a colour


def _series(history: list[dict[str, Any]], key: str, label: str, dashed: bool = False) -> Series | None:
    points = [(r["epoch"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
    if not points:
        return None
    return Series(label, tuple(float(x) for x, _ in points), tuple(float(y) for _, y in points), dashed)


def curve_panels(history: list[dict[str, Any]]) -> list[Panel]:
    """The panels of a run's training curves, x = epoch: loss (train, validation), validation scores
    (UAR, accuracy) and the learning rate; a continual run's score panel is the mean test accuracy
    over the tasks learned so far, at each task's end."""
    panels = []
    loss = [s for s in (_series(history, "train_loss", "train"),
                        _series(history, "val_loss", "validation", dashed=True)) if s]
    if loss:
        panels.append(Panel("loss", "cross-entropy loss", tuple(loss), first_colour=0))
    scores = [s for s in (_series(history, "val_uar", "validation UAR"),
                          _series(history, "val_accuracy", "validation accuracy (WAR)", dashed=True)) if s]
    ends = [r for r in history if "accuracies" in r and r.get("task")]
    if ends:
        means = tuple(sum(r["accuracies"][: r["task"]]) / r["task"] for r in ends)
        scores.append(Series("mean test accuracy over learned tasks", tuple(float(r["epoch"]) for r in ends), means))
    if scores:
        panels.append(Panel("validation scores" if not ends else "test accuracy", "score", tuple(scores), (0.0, 1.0),
                            first_colour=2))
    lr = _series(history, "lr", "learning rate (epoch's last step)")
    if lr:
        panels.append(Panel("learning rate", "lr", (lr,), first_colour=4))
    return panels


# --------------------------------------------------------------------------------------------------
# Colours


def _hex_rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def blues(fraction: float) -> tuple[float, float, float]:
    """The "Blues" colour at `fraction` in 0..1 (linear between its anchors), RGB in 0..1."""
    fraction = min(max(fraction, 0.0), 1.0) * (len(BLUES_ANCHORS) - 1)
    low = min(int(fraction), len(BLUES_ANCHORS) - 2)
    a, b, t = _hex_rgb(BLUES_ANCHORS[low]), _hex_rgb(BLUES_ANCHORS[low + 1]), fraction - low
    return tuple(x + (y - x) * t for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def _relative_luminance(rgb: Sequence[float]) -> float:
    """WCAG relative luminance of an sRGB colour with channels in 0..1."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def text_colour_for(background: Sequence[float]) -> str:
    """"white" or "black", whichever contrasts more with `background` (RGB or RGBA in 0..1)."""
    luminance = _relative_luminance(background)
    contrast_white = 1.05 / (luminance + 0.05)
    contrast_black = (luminance + 0.05) / 0.05
    return "white" if contrast_white > contrast_black else "black"


def _css(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb[:3])


def confusion_pixels(confusion: Sequence[Sequence[int]], cell: int = 24) -> Any:
    """The confusion matrix as an RGB image (uint8 [H, W, 3]): `cell` pixels per count, coloured
    as the heat map, a white line between cells (TensorBoard's image without matplotlib)."""
    import numpy as np

    n = len(confusion)
    top = max((max(row) for row in confusion), default=1) or 1
    image = np.full((n * cell, n * cell, 3), 255, dtype=np.uint8)
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            colour = [round(c * 255) for c in blues(count / top)]
            image[i * cell:(i + 1) * cell - 1, j * cell:(j + 1) * cell - 1] = colour
    return image


# --------------------------------------------------------------------------------------------------
# SVG


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering low..high."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(math.ceil((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def line_chart_svg(panel: Panel, *, width: int = 420, height: int = 260) -> str:
    """One panel as an SVG line chart: axes with round ticks, a line and markers per series (dashed
    series dashed, hollow markers), a legend below."""
    left, right, top, legend_rows = 66, 12, 28, len(panel.series)
    bottom = 36 + 16 * legend_rows
    xs = [x for s in panel.series for x in s.xs]
    ys = [y for s in panel.series for y in s.ys if math.isfinite(y)]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = panel.y_range or ((min(ys), max(ys)) if ys else (0.0, 1.0))
    y_ticks = _nice_ticks(y_low, y_high)
    if panel.y_range is None and y_ticks:
        y_low, y_high = y_ticks[0], y_ticks[-1]
    if y_high == y_low:
        y_high = y_low + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    parts = [(f'<svg class="chart" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(panel.title)}">'),
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(panel.title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for tick in y_ticks:
        if y_low - 1e-12 <= tick <= y_high + 1e-12:
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(tick):.1f}" y2="{py(tick):.1f}" '
                         f'stroke="#e5e5e5"/><text x="{left - 4}" y="{py(tick) + 4:.1f}" text-anchor="end" '
                         f'font-size="11">{_label(tick)}</text>')
    epochs = sorted(set(xs))
    every = max(1, math.ceil(len(epochs) / 10))
    for x in epochs[::every]:
        parts.append(f'<text x="{px(x):.1f}" y="{top + plot_h + 14}" text-anchor="middle" font-size="11">'
                     f'{x:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 28}" text-anchor="middle" font-size="11">'
                 f'epoch</text>')
    parts.append(f'<text x="12" y="{top + plot_h / 2}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 12 {top + plot_h / 2})">{escape(panel.y_label)}</text>')
    for k, series in enumerate(panel.series):
        colour = PALETTE[(panel.first_colour + k if series.colour is None else series.colour) % len(PALETTE)]
        points = [(px(x), py(y)) for x, y in zip(series.xs, series.ys, strict=True) if math.isfinite(y)]
        dash = ' stroke-dasharray="6 4"' if series.dashed else ""
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline class="series" points="{path}" fill="none" stroke="{colour}" '
                         f'stroke-width="2"{dash}/>')
        fill = "white" if series.dashed else colour
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{4.5 if series.dashed else 3.5}" fill="{fill}" '
                     f'stroke="{colour}" stroke-width="1.5"/>' for x, y in points)
        legend_y = top + plot_h + 44 + 16 * k
        parts.append(f'<line x1="{left}" x2="{left + 24}" y1="{legend_y - 4}" y2="{legend_y - 4}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/><text x="{left + 30}" y="{legend_y}" font-size="11">'
                     f'{escape(series.label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap_svg(confusion: Sequence[Sequence[int]], classes: Sequence[str], *, cell: int = 34) -> str:
    """A confusion matrix (true class per row, predicted per column) as an SVG heat map with each
    count written in the colour that contrasts with its cell."""
    n = len(classes)
    label_w = 8 + 7 * max((len(c) for c in classes), default=1)
    width, height = label_w + n * cell + 10, label_w + n * cell + 30
    top = max((max(row) for row in confusion), default=1) or 1
    parts = [(f'<svg class="confusion" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="confusion matrix">')]
    for i, row in enumerate(confusion):
        y = 20 + i * cell
        parts.append(f'<text x="{label_w - 6}" y="{y + cell / 2 + 4}" text-anchor="end" font-size="11">'
                     f'{escape(classes[i])}</text>')
        for j, count in enumerate(row):
            x, colour = label_w + j * cell, blues(count / top)
            weight = ' font-weight="bold"' if i == j else ""
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{_css(colour)}">'
                         f'<title>true {escape(classes[i])} → predicted {escape(classes[j])}: {count}</title></rect>'
                         f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" font-size="11" '
                         f'fill="{text_colour_for(colour)}"{weight}>{count}</text>')
    base = 20 + n * cell + 6
    for j, name in enumerate(classes):
        x = label_w + j * cell + cell / 2
        parts.append(f'<text x="{x}" y="{base}" text-anchor="end" font-size="11" '
                     f'transform="rotate(-45 {x} {base})">{escape(name)}</text>')
    parts.append(f'<text x="{label_w + n * cell / 2}" y="12" text-anchor="middle" font-size="11">'
                 f'predicted class →</text></svg>')
    return "".join(parts)


def stacked_bar_svg(parts: Sequence[tuple[str, int]], describe: Callable[[float], str], *, limit: int | None = None,
                    width: int = 640) -> str:
    """Amounts by category as one stacked bar, a legend with each amount (`describe`d) and share
    below; `limit` (a budget) draws the bar to its scale with a marker at the limit."""
    total = sum(v for _, v in parts)
    scale = max(total, limit or 0, 1)
    inner = width - 20
    pieces, x = [], 10.0
    for k, (name, value) in enumerate(parts):
        w = value / scale * inner
        pieces.append(f'<rect x="{x:.1f}" y="8" width="{w:.1f}" height="26" fill="{PALETTE[k % len(PALETTE)]}">'
                      f'<title>{escape(name)}: {describe(value)}</title></rect>')
        x += w
    if limit:
        lx = 10 + limit / scale * inner
        pieces.append(f'<line x1="{lx:.1f}" x2="{lx:.1f}" y1="2" y2="40" stroke="black" stroke-width="2" '
                      f'stroke-dasharray="3 2"/>')
    rows = math.ceil(len(parts) / 3)
    for k, (name, value) in enumerate(parts):
        lx, ly = 10 + (k % 3) * (inner / 3), 56 + 18 * (k // 3)
        share = f"{100 * value / total:.0f} %" if total else "—"
        pieces.append(f'<rect x="{lx:.1f}" y="{ly - 10}" width="12" height="12" fill="{PALETTE[k % len(PALETTE)]}"/>'
                      f'<text x="{lx + 18:.1f}" y="{ly}" font-size="12">{escape(name)} {describe(value)} '
                      f'({share})</text>')
    height = 56 + 18 * rows
    return (f'<svg class="memory" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="memory by category">{"".join(pieces)}</svg>')

