"""Lineage graphs drawn as SVG on the server, so the `/ui` page and the graph file `mlbus demo`
writes show a picture with nothing fetched from the internet and no JavaScript.

Layered left to right (dataset versions → runs → model versions → replicas): each node's
column is its longest path from a source, rows follow first appearance. Readable at any
length: a node is as wide as its column's longest line (a line longer than `WRAP` characters
is wrapped, the whole label kept in the node's tooltip) and as tall as its lines; each gap
between columns is as wide as the names of the relations crossing it, written once above
the gap instead of on every edge (labels on edges overlap as soon as edges fan out).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

MIN_W, MIN_H, MIN_GAP_X, GAP_Y, PAD = 150, 44, 80, 22, 20
LINE_H, FONT_W, SMALL_W, TITLE_W = 15, 7.4, 6.2, 8.6
"""line height; an upper bound of the advance of a character of Helvetica/Arial at 12 px,
10 px and 14 px bold (wide capitals and digits included), so text never outgrows its box"""
WRAP = 44
HEADER = 24  # the row of relation names above the gaps
_FILL = {
    "dataset": ("#dbeafe", "#1e40af", ""),
    "unknown": ("#ffffff", "#b91c1c", "6 4"),
    "run": ("#fef3c7", "#92400e", ""),
    "model": ("#dcfce7", "#166534", ""),
    "replica": ("#f3f4f6", "#374151", ""),
}


def wrap(line: str, width: int = WRAP) -> list[str]:
    """`line` in pieces of at most `width` characters, broken after a separator where one is
    near the end of a piece."""
    out = []
    while len(line) > width:
        cut = max(line.rfind(sep, width // 2, width) for sep in " @:/-_.")
        cut = cut + 1 if cut > 0 else width
        out.append(line[:cut].rstrip())
        line = line[cut:].lstrip()
    out.append(line)
    return out


def _lines(label: str) -> list[str]:
    return [piece for line in label.split("\\n") for piece in wrap(line)]


def render_svg(
    nodes: Mapping[str, tuple[str, str]],
    edges: Sequence[tuple[str, str, str]],
    title: str = "lineage",
    links: Mapping[str, str] | None = None,
) -> str:
    """`nodes`: id → (label with `\\n` line breaks, kind); `edges`: (source, target, label);
    `links`: id → the URL a click on the node opens (the /ui pages; none in a file)."""
    rank = {node: 0 for node in nodes}
    for _ in range(len(nodes)):  # longest path by relaxation: graphs here are small DAGs
        changed = False
        for src, dst, _label in edges:
            if src in rank and dst in rank and rank[dst] < rank[src] + 1:
                rank[dst] = rank[src] + 1
                changed = True
        if not changed:
            break
    columns = max(rank.values(), default=0) + 1
    lines = {node: _lines(label) for node, (label, _kind) in nodes.items()}
    widths = [MIN_W] * columns
    for node, text in lines.items():
        need = max(len(line) for line in text) * FONT_W + 24
        widths[rank[node]] = max(widths[rank[node]], int(need + 0.999))
    # the relations crossing each gap (column c → c + 1 and beyond: named at the first gap)
    crossing: list[list[str]] = [[] for _ in range(columns)]
    for src, dst, label in edges:
        if src in rank and dst in rank and label not in crossing[rank[src]]:
            crossing[rank[src]].append(label)
    gaps = [
        max(MIN_GAP_X, int(len(", ".join(crossing[c])) * SMALL_W + 24 + 0.999))
        for c in range(columns)
    ]
    lefts = [PAD]
    for c in range(1, columns):
        lefts.append(lefts[-1] + widths[c - 1] + gaps[c - 1])
    top = PAD + 24 + HEADER
    heights = {node: max(MIN_H, len(text) * LINE_H + 14) for node, text in lines.items()}
    bottoms = [top] * columns
    box: dict[str, tuple[float, float, float, float]] = {}  # x, y, width, height
    for node in nodes:
        c = rank[node]
        box[node] = (lefts[c], bottoms[c], widths[c], heights[node])
        bottoms[c] += heights[node] + GAP_Y
    width = max(
        lefts[-1] + widths[-1] + PAD,
        int(PAD * 2 + len(title) * TITLE_W + 0.999),
    )
    height = max(bottoms) - GAP_Y + PAD if nodes else top + PAD
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" '
        f'font-size="12" role="img" aria-label="{escape(title)}">',
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='7' "
        "markerHeight='7' orient='auto'><path d='M0,0 L10,5 L0,10 z' fill='#6b7280'/></marker>"
        "</defs>",
        f'<text x="{PAD}" y="{PAD + 8}" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for c in range(columns - 1):
        if crossing[c]:
            middle = lefts[c] + widths[c] + gaps[c] / 2
            out.append(
                f'<text class="relation" x="{middle}" y="{PAD + 24 + 12}" text-anchor="middle" '
                f'fill="#4b5563" font-size="10">{escape(", ".join(crossing[c]))}</text>'
            )
    for src, dst, label in edges:
        if src not in box or dst not in box:
            continue
        (x1, y1, w1, h1), (x2, y2, _w2, h2) = box[src], box[dst]
        x1, y1, y2 = x1 + w1, y1 + h1 / 2, y2 + h2 / 2
        middle = (x1 + x2) / 2
        out.append(
            f'<path d="M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}" fill="none" '
            f'stroke="#6b7280" marker-end="url(#arrow)"><title>{escape(label)}</title></path>'
        )
    for node, (label, kind) in nodes.items():
        x, y, w, h = box[node]
        fill, stroke, dash = _FILL.get(kind, _FILL["replica"])
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        tooltip = escape(node + "\n" + label.replace("\\n", " "))
        href = (links or {}).get(node)
        if href:
            out.append(f'<a href="{escape(href)}">')
        out.append(
            f'<g class="node"><title>{tooltip}</title><rect x="{x}" y="{y}" width="{w}" '
            f'height="{h}" rx="8" fill="{fill}" stroke="{stroke}"{dashes}/>'
        )
        text = lines[node]
        for i, line in enumerate(text):
            dy = y + h / 2 + (i - (len(text) - 1) / 2) * LINE_H + 4
            out.append(
                f'<text x="{x + w / 2}" y="{dy}" text-anchor="middle" fill="{stroke}">'
                f"{escape(line)}</text>"
            )
        out.append("</g></a>" if href else "</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"
