"""What the benchmarks share: figures, their ratios, and the table they print."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: frozenset[int] = frozenset({1, 2, 3}),
) -> list[str]:
    """Aligned text lines: the header, a rule, then the rows (columns in `right` right-aligned)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


@dataclass
class Figure:
    """One measured figure; `baseline_key` names the figure it is compared with."""

    key: str
    label: str
    value: float
    baseline_key: str | None = None
    target: str = ""
    ok: bool | None = None  # None: no target
    detail: dict[str, Any] = field(default_factory=dict)
    unit: str = "events/s"


class Figures:
    """What a benchmark report does with its `figures` (mixed into each report)."""

    figures: dict[str, Figure]

    def add(self, figure: Figure) -> Figure:
        self.figures[figure.key] = figure
        return figure

    def baseline(self, figure: Figure) -> float | None:
        return self.figures[figure.baseline_key].value if figure.baseline_key else None

    def ratio(self, figure: Figure) -> float | None:
        base = self.baseline(figure)
        return figure.value / base if base else None
