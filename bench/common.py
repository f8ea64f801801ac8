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


#: Set by bench/run_all.py: each benchmark appends its figures here as JSON lines.
SUMMARY_ENV = "MLBUS_BENCH_SUMMARY"


def summary_line(
    benchmark: str,
    label: str,
    value: float,
    unit: str,
    *,
    baseline: str = "",
    ratio: float | None = None,
    target: str = "",
    ok: bool | None = None,
) -> None:
    """Record one figure for bench/run_all.py's combined table (no-op when run alone)."""
    import json
    import os

    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    entry = {
        "benchmark": benchmark,
        "label": label,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "ok": ok,
    }
    with open(path, "a") as out:
        out.write(json.dumps(entry) + "\n")


def publish_summary(benchmark: str, report: Figures) -> None:
    """Every figure of `report`, for bench/run_all.py."""
    for f in report.figures.values():
        base = report.figures[f.baseline_key].label if f.baseline_key else ""
        summary_line(
            benchmark,
            f.label,
            f.value,
            f.unit,
            baseline=base,
            ratio=report.ratio(f),
            target=f.target,
            ok=f.ok,
        )


def print_report(report: Any, table: str, as_json: bool, stopped: str) -> None:
    """What a benchmark with `figures` and `setup` prints at the end: one JSON object, or its
    table and a last line with the wall time and what was stopped."""
    if as_json:
        import json

        figures = {
            k: {"value": f.value, "ratio": report.ratio(f), "ok": f.ok, **f.detail}
            for k, f in report.figures.items()
        }
        print(json.dumps({"setup": report.setup, "figures": figures}))
    else:
        print(table)
        print(f"total wall time {report.setup['wall_seconds']} s; {stopped}")
