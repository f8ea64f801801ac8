"""Lineage answers as graphs a person can look at: Graphviz DOT and Mermaid flowcharts.

Dataset versions → run → model version → replicas; an unknown upstream is drawn dashed and
labelled so, never left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlbus.consumers.lineage.entities import DatasetNode, Downstream, Upstream


@dataclass
class Graph:
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # id → (label, kind)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (src, dst, label)

    def node(self, node_id: str, label: str, kind: str) -> str:
        self.nodes.setdefault(node_id, (label, kind))
        return node_id

    def edge(self, src: str, dst: str, label: str) -> None:
        if (src, dst, label) not in self.edges:
            self.edges.append((src, dst, label))


def _short(version: str, width: int = 16) -> str:
    return version if len(version) <= width else version[: width - 1] + "…"


def _datasets(graph: Graph, node: DatasetNode) -> str:
    label = f"{node.name}@{_short(node.version)}"
    if not node.known:
        label += "\\n(unknown upstream)"
    node_id = graph.node(
        f"dataset:{node.name}@{node.version}", label, "dataset" if node.known else "unknown"
    )
    for parent in node.parents:
        graph.edge(_datasets(graph, parent), node_id, "derived")
    return node_id


def upstream_graph(up: Upstream) -> Graph:
    graph = Graph()
    model = graph.node(
        f"model:{up.model}@{up.version}",
        f"{up.model}@{_short(up.version)}"
        + ("\\n(serving)" if up.serving else "\\n(failed to load)" if up.load_failure else ""),
        "model",
    )
    if up.run.run_id is not None:
        run = graph.node(f"run:{up.run.run_id}", f"run {up.run.run_id}\\n{up.run.status}", "run")
        graph.edge(run, model, "produced")
    else:
        run = graph.node("run:?", "run\\n(unknown upstream)", "unknown")
        graph.edge(run, model, "produced")
    for dataset in up.datasets:
        graph.edge(_datasets(graph, dataset), run, "trained on")
    if not up.datasets:
        graph.edge(
            graph.node("dataset:?", "dataset\\n(unknown upstream)", "unknown"), run, "trained on"
        )
    for deployment in up.deployments:
        replica = graph.node(
            f"replica:{deployment.replica}", f"replica {deployment.replica}", "replica"
        )
        graph.edge(model, replica, deployment.status)
    return graph


def downstream_graph(down: Downstream) -> Graph:
    graph = Graph()
    for use in down.versions:
        label = f"{use.name}@{_short(use.version)}" + ("" if use.known else "\\n(unknown)")
        dataset = graph.node(
            f"dataset:{use.name}@{use.version}", label, "dataset" if use.known else "unknown"
        )
        for child in use.derived:
            name = child.removeprefix("dataset:")
            graph.edge(dataset, graph.node(child, _short(name, 40), "dataset"), "derived")
        for u in use.uses:
            run_id = u.run_id or u.provenance.event_id
            run = graph.node(f"run:{run_id}", f"run {run_id}\\n{u.status}", "run")
            graph.edge(dataset, run, "trained on")
            if u.version is not None:
                label = f"{u.model}@{_short(u.version)}" + ("\\n(serving)" if u.serving_now else "")
                model = graph.node(f"model:{u.model}@{u.version}", label, "model")
                graph.edge(run, model, "produced")
                for replica in u.replicas:
                    node = graph.node(
                        f"replica:{u.model}/{replica}", f"replica {replica}", "replica"
                    )
                    graph.edge(model, node, "serves")
    return graph


_DOT_STYLE = {
    "dataset": 'shape=cylinder, style=filled, fillcolor="#dbeafe"',
    "unknown": 'shape=box, style="dashed", color="#b91c1c", fontcolor="#b91c1c"',
    "run": 'shape=box, style="rounded,filled", fillcolor="#fef3c7"',
    "model": 'shape=box3d, style=filled, fillcolor="#dcfce7"',
    "replica": 'shape=component, style=filled, fillcolor="#f3f4f6"',
}


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def to_dot(graph: Graph, title: str = "lineage") -> str:
    lines = [f"digraph {_quote(title)} {{", "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for node_id, (label, kind) in graph.nodes.items():
        lines.append(f"  {_quote(node_id)} [label={_quote(label)}, {_DOT_STYLE[kind]}];")
    for src, dst, label in graph.edges:
        lines.append(f"  {_quote(src)} -> {_quote(dst)} [label={_quote(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_mermaid(graph: Graph) -> str:
    ids = {node_id: f"n{i}" for i, node_id in enumerate(graph.nodes)}
    shapes = {
        "dataset": ("[(", ")]"),
        "unknown": ("[/", "/]"),
        "run": ("(", ")"),
        "model": ("[[", "]]"),
        "replica": ("[", "]"),
    }
    lines = ["flowchart LR"]
    for node_id, (label, kind) in graph.nodes.items():
        left, right = shapes[kind]
        text = label.replace("\\n", "<br/>").replace('"', "'")
        lines.append(f'  {ids[node_id]}{left}"{text}"{right}')
    for src, dst, label in graph.edges:
        lines.append(f"  {ids[src]} -->|{label}| {ids[dst]}")
    lines.append("  classDef unknown stroke:#b91c1c,stroke-dasharray:5 5,color:#b91c1c")
    unknown = [ids[n] for n, (_, kind) in graph.nodes.items() if kind == "unknown"]
    if unknown:
        lines.append(f"  class {','.join(unknown)} unknown")
    return "\n".join(lines) + "\n"
