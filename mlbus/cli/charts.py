"""Learning curves drawn as SVG on the server for the `/ui` run and compare pages: one line
per run over the epochs, on shared axes, with a legend — no JavaScript, nothing fetched from
the internet."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

W, H = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 34, 40
#: A palette that stays distinguishable for the colour-blind (Okabe-Ito), then repeats.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


@dataclass(frozen=True)
class Series:
    key: str
    """what the line stands for (a run id): the `data-run` of its path"""
    label: str
    points: Sequence[tuple[float, float]]


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= step * factor:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def line_chart(title: str, series: Sequence[Series], *, x_label: str = "epoch") -> str:
    """An SVG line chart of `series` (x: epoch), one path per series (class `curve`,
    `data-run` its key) in the colour of its index; a series of one point is a dot."""
    points = [(x, y) for s in series for x, y in s.points if math.isfinite(y)]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{W}" '
        f'height="{H + 18 * len(series)}" viewBox="0 0 {W} {H + 18 * len(series)}" '
        f'font-family="Helvetica, Arial, sans-serif" font-size="11" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    if not points:
        out.append(f'<text x="{LEFT}" y="{H / 2}" fill="#6b7280">no epochs reported</text></svg>')
        return "\n".join(out) + "\n"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.05 - 0.5, y1 + abs(y1) * 0.05 + 0.5
    sx, sy = _frame(out, x0, x1, y0, y1, x0, x_label)
    for i, s in enumerate(series):
        finite = [(x, y) for x, y in s.points if math.isfinite(y)]
        stroke = color(i)
        legend_y = H + 18 * i + 4
        label = s.label if finite else f"{s.label} (no epochs reported)"
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + 22}" y1="{legend_y}" y2="{legend_y}" '
            f'stroke="{stroke}" stroke-width="3"/>'
            f'<text x="{LEFT + 30}" y="{legend_y + 4}">{escape(label)}</text>'
        )
        if not finite:
            continue
        if len(finite) == 1:
            x, y = finite[0]
            shape = f'<circle cx="{sx(x)}" cy="{sy(y)}" r="3" fill="{stroke}"'
        else:
            d = " ".join(
                f"{'M' if j == 0 else 'L'}{sx(x)},{sy(y)}" for j, (x, y) in enumerate(finite)
            )
            shape = f'<path d="{d}" fill="none" stroke="{stroke}" stroke-width="2"'
        out.append(
            f'{shape} class="curve" data-run="{escape(s.key)}"><title>{escape(s.label)}'
            f"</title></{'circle' if len(finite) == 1 else 'path'}>"
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class TrialPoint:
    number: int
    state: str
    """completed, pruned, failed or running"""
    value: float | None
    """a completed trial's objective; otherwise the newest epoch's (None: none reported)"""
    run_id: str


#: How each trial state is drawn: fill, stroke, and the legend's words.
_TRIAL_STYLE = {
    "completed": ("#0072B2", "#0072B2", "completed"),
    "pruned": ("#ffffff", "#D55E00", "pruned (its last epoch)"),
    "running": ("#ffffff", "#6b7280", "running (its last epoch)"),
}


def trial_chart(title: str, trials: Sequence[TrialPoint], *, maximize: bool = True) -> str:
    """An SVG of a search's objective against the trial number: a dot per trial (class
    `trial`, `data-trial` its number, `data-state` its state: filled when completed, hollow
    when pruned or still running, at its newest epoch's value), and the best completed value
    so far as a step line (class `best`)."""
    shown = [t for t in trials if t.value is not None and math.isfinite(t.value)]
    states = [s for s in _TRIAL_STYLE if any(t.state == s for t in shown)]
    legend = len(states) + 1
    height = H + 18 * legend
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart trials" width="{W}" '
        f'height="{height}" viewBox="0 0 {W} {height}" font-family="Helvetica, Arial, '
        f'sans-serif" font-size="11" role="img" aria-label="{escape(title)}">',
        f'<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    if not shown:
        out.append(f'<text x="{LEFT}" y="{H / 2}" fill="#6b7280">no trial has a value yet</text>')
        return "\n".join([*out, "</svg>"]) + "\n"
    x0, x1 = min(t.number for t in trials) - 0.5, max(t.number for t in trials) + 0.5
    values = [t.value for t in shown if t.value is not None]
    y0, y1 = min(values), max(values)
    if y1 == y0:
        y0, y1 = y0 - abs(y0) * 0.05 - 0.05, y1 + abs(y1) * 0.05 + 0.05
    sx, sy = _frame(out, x0, x1, y0, y1, max(x0, 0), "trial")
    # the best completed value so far, as a step after each trial that improved it
    steps: list[tuple[float, float]] = []
    best: float | None = None
    for t in sorted(shown, key=lambda t: t.number):
        if t.state != "completed" or t.value is None:
            continue
        if best is None or (t.value > best if maximize else t.value < best):
            if best is not None:
                steps.append((t.number, best))
            best = t.value
            steps.append((t.number, best))
    if best is not None:
        steps.append((x1, best))
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x)},{sy(y)}" for i, (x, y) in enumerate(steps))
        out.append(
            f'<path d="{d}" fill="none" stroke="#009E73" stroke-width="2" class="best">'
            "<title>best so far</title></path>"
        )
    for t in shown:
        assert t.value is not None
        fill, stroke, _ = _TRIAL_STYLE.get(t.state, _TRIAL_STYLE["running"])
        out.append(
            f'<circle cx="{sx(t.number)}" cy="{sy(t.value)}" r="4" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="1.5" class="trial" data-trial="{t.number}" '
            f'data-state="{escape(t.state)}" data-run="{escape(t.run_id)}"><title>trial '
            f"{t.number} {escape(t.state)}: {_fmt(t.value)}</title></circle>"
        )
    for i, state in enumerate(states):
        fill, stroke, words = _TRIAL_STYLE[state]
        y = H + 18 * i + 4
        out.append(
            f'<circle cx="{LEFT + 11}" cy="{y}" r="4" fill="{fill}" stroke="{stroke}" '
            f'stroke-width="1.5"/><text x="{LEFT + 30}" y="{y + 4}">{escape(words)}</text>'
        )
    y = H + 18 * len(states) + 4
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT + 22}" y1="{y}" y2="{y}" stroke="#009E73" '
        f'stroke-width="2"/><text x="{LEFT + 30}" y="{y + 4}">best completed so far</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _frame(
    out: list[str], x0: float, x1: float, y0: float, y1: float, x_from: float, x_label: str
) -> tuple[Callable[[float], float], Callable[[float], float]]:
    """The plot's frame, its y grid with labels (the y range padded by 5% each way), the
    integer x labels from `x_from` and the x axis title, appended to `out`; returns the
    scales of x and y to the page."""
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return round(LEFT + (x - x0) / (x1 - x0) * plot_w, 2)

    def sy(y: float) -> float:
        return round(TOP + (1 - (y - y0) / (y1 - y0)) * plot_h, 2)

    out.append(
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
        f'stroke="#d1d5db"/>'
    )
    for y in _ticks(y0, y1):
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{sy(y)}" y2="{sy(y)}" stroke="#f3f4f6"/>'
            f'<text x="{LEFT - 6}" y="{sy(y) + 4}" text-anchor="end" fill="#4b5563">'
            f"{_fmt(y)}</text>"
        )
    for x in _ticks(x_from, x1, 8):
        if float(x).is_integer():
            out.append(
                f'<text x="{sx(x)}" y="{TOP + plot_h + 16}" text-anchor="middle" '
                f'fill="#4b5563">{int(x)}</text>'
            )
    out.append(
        f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h + 32}" text-anchor="middle" '
        f'fill="#4b5563">{escape(x_label)}</text>'
    )
    return sx, sy
