"""Lineage graphs drawn as SVG on the server, so the `/ui` page and the graph file `mlbus demo`
writes show a picture with nothing fetched from the internet and no JavaScript.

Layered left to right (dataset versions → runs → model versions → replicas): each node's
column is its longest path from a source, rows follow first appearance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 210, 54, 80, 26, 20
_FILL = {
    "dataset": ("#dbeafe", "#1e40af", ""),
    "unknown": ("#ffffff", "#b91c1c", "6 4"),
    "run": ("#fef3c7", "#92400e", ""),
    "model": ("#dcfce7", "#166534", ""),
    "replica": ("#f3f4f6", "#374151", ""),
}


def render_svg(
    nodes: Mapping[str, tuple[str, str]],
    edges: Sequence[tuple[str, str, str]],
    title: str = "lineage",
) -> str:
    """`nodes`: id → (label with `\\n` line breaks, kind); `edges`: (source, target, label)."""
    rank = {node: 0 for node in nodes}
    for _ in range(len(nodes)):  # longest path by relaxation: graphs here are small DAGs
        changed = False
        for src, dst, _label in edges:
            if src in rank and dst in rank and rank[dst] < rank[src] + 1:
                rank[dst] = rank[src] + 1
                changed = True
        if not changed:
            break
    rows: dict[int, int] = {}
    position: dict[str, tuple[float, float]] = {}
    for node in nodes:
        column = rank[node]
        row = rows.get(column, 0)
        rows[column] = row + 1
        position[node] = (
            PAD + column * (NODE_W + GAP_X),
            PAD + 24 + row * (NODE_H + GAP_Y),
        )
    width = PAD * 2 + (max(rank.values(), default=0) + 1) * (NODE_W + GAP_X) - GAP_X
    height = PAD * 2 + 24 + max(rows.values(), default=1) * (NODE_H + GAP_Y) - GAP_Y
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" '
        f'font-size="12" role="img" aria-label="{escape(title)}">',
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' "
        "markerHeight='7' orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='#6b7280'/></marker>"
        "</defs>",
        f'<text x="{PAD}" y="{PAD + 8}" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for src, dst, label in edges:
        if src not in position or dst not in position:
            continue
        (x1, y1), (x2, y2) = position[src], position[dst]
        x1, y1, y2 = x1 + NODE_W, y1 + NODE_H / 2, y2 + NODE_H / 2
        middle = (x1 + x2) / 2
        out.append(
            f'<path d="M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}" fill="none" '
            f'stroke="#6b7280" marker-end="url(#arrow)"/>'
            f'<text x="{middle}" y="{(y1 + y2) / 2 - 4}" text-anchor="middle" fill="#4b5563" '
            f'font-size="10">{escape(label)}</text>'
        )
    for node, (label, kind) in nodes.items():
        x, y = position[node]
        fill, stroke, dash = _FILL.get(kind, _FILL["replica"])
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(
            f'<g><title>{escape(node)}</title><rect x="{x}" y="{y}" width="{NODE_W}" '
            f'height="{NODE_H}" rx="8" fill="{fill}" stroke="{stroke}"{dashes}/>'
        )
        lines = label.split("\\n")
        for i, line in enumerate(lines):
            dy = y + NODE_H / 2 + (i - (len(lines) - 1) / 2) * 15 + 4
            out.append(
                f'<text x="{x + NODE_W / 2}" y="{dy}" text-anchor="middle" fill="{stroke}">'
                f"{escape(line)}</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
