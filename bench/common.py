"""What the benchmarks share: the figures table they print."""

from __future__ import annotations

from collections.abc import Sequence


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
