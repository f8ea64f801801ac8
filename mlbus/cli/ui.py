"""`GET /ui`: the read-only pages of the control plane — every model with its serving
version (loaded by a replica; a champion that is not is named beside it), the most recent
events of the log, and a model's lineage graph as a picture (SVG drawn on the server: no
JavaScript, nothing fetched from the internet); the experiment and model pages are in
ui_runs.py. Everything on them is a query of the lineage store (the projector has already
read and checked the log): a page view does not re-read the log (searches come from the
tuning state the control plane keeps current, reading only what is new)."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from mlbus.cli.svg import render_svg

if TYPE_CHECKING:
    from mlbus.consumers.lineage.entities import ModelSummary, ModelVersion, RecentEvent

_STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:2rem;color:#111827}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.9rem}td,th{border-bottom:1px solid #e5e7eb;
padding:.3rem .8rem;text-align:left}th{background:#f9fafb}code{font-size:.85rem}
.champion{color:#166534;font-weight:bold}.rejected{color:#92400e}.muted{color:#6b7280}
nav a{margin-right:1rem}.filters{margin:1rem 0}.filters label{margin-right:.8rem}
.facts th{width:10rem}.charts{display:flex;flex-wrap:wrap;gap:1rem}
.compare td.differs,.compare th.differs{background:#fef9c3;font-weight:bold}
.compare td.best{background:#dcfce7;color:#166534;font-weight:bold}
.swatch{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;border-radius:2px}
.status-completed{color:#166534}.status-failed{color:#b91c1c}.status-running{color:#92400e}
.status-pruned{color:#9a3412}.search-head th{background:#eef2ff;font-weight:normal}
.decision-promoted{color:#166534}.decision-rejected{color:#92400e}pre{font-size:.8rem}
.graph{overflow-x:auto}
"""
RECENT_TOPICS = (
    "dataset.validated", "training.requested", "training.completed", "training.failed",
    "model.promoted", "model.rejected", "model.traffic", "deployment.updated", "serving.alert",
)  # fmt: skip


_NAV = "<nav><a href='/ui'>models</a><a href='/ui/runs'>runs</a></nav>"


def page(title: str, body: str) -> HTMLResponse:
    # an empty icon: the browser asks for none (a /favicon.ico 404 is a console error)
    return HTMLResponse(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<link rel='icon' href='data:,'><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{_NAV}{body}</body></html>"
    )


_CLASS = {"champion": "champion", "rejected": "rejected"}


def _title(v: ModelVersion) -> str:
    if v.load_failure:
        return f"{v.status}, not serving: failed to load: {v.load_failure}"
    return f"{v.status}, serving on {', '.join(v.replicas)}" if v.serving else v.status


def _model_row(m: ModelSummary) -> str:
    # What the replicas serve (deployment.updated), not the last promotion: a champion that
    # failed to load is shown beside the version that keeps serving.
    serving = escape(m.serving or "-")
    champion = m.champion.version if m.champion else None
    if champion is not None and champion != m.serving:
        failed = next((v.load_failure for v in m.versions if v.version == champion), None)
        why = f"failed to load: {failed}" if failed else "not loaded yet"
        serving += (
            f" <span class='rejected' title='{escape(why)}'>(champion {escape(champion)}: "
            f"{escape(why)})</span>"
        )
    versions = " ".join(
        f"<span class='{_CLASS.get(v.status, 'muted')}' title='{escape(_title(v))}'>"
        f"{escape(v.version)}</span>"
        for v in m.versions
    )
    name, path = escape(m.model), quote(m.model, safe="")
    return (
        f"<tr><td><a href='/ui/models/{path}'>{name}</a></td>"
        f"<td class='champion'>{serving}</td><td>{versions}</td>"
        f"<td><a href='/ui/runs?model={path}'>runs</a> · "
        f"<a href='/ui/lineage/{path}'>lineage</a></td></tr>"
    )


def _event_row(e: RecentEvent) -> str:
    return (
        f"<tr><td class='muted'>{escape((e.time or '')[:19])}</td><td>{escape(e.type)}</td>"
        f"<td>{escape(e.subject or '')}</td><td><code>{escape(e.id)}</code></td></tr>"
    )


def create_router(
    lineage: Callable[[], Any], searches: Callable[[], Any] | None = None
) -> APIRouter:
    """The pages; `searches` (a `consumers.tuning.api.Searches` provider) adds the searches
    to the runs page and their own pages."""
    router = APIRouter(tags=["ui"], include_in_schema=False)

    @router.get("/ui", response_class=HTMLResponse)
    async def home(limit: int = Query(25, ge=1, le=500)) -> HTMLResponse:
        from mlbus.consumers.lineage.queries import LineageQueries

        queries = LineageQueries(lineage())
        models, recent = await run_in_threadpool(
            lambda: (queries.models(), queries.recent(RECENT_TOPICS, limit))
        )
        rows = "".join(_model_row(m) for m in models)
        events = "".join(_event_row(e) for e in recent)
        body = (
            "<h1>mlbus</h1><h2>Models</h2><table><tr><th>model</th><th>serving</th>"
            f"<th>versions</th><th></th></tr>{rows or '<tr><td>no models yet</td></tr>'}</table>"
            f"<h2>Recent events</h2><table><tr><th>time</th><th>type</th><th>subject</th>"
            f"<th>id</th></tr>{events}</table>"
        )
        return page("mlbus", body)

    # Declared before `/ui/lineage/{model}`, which would otherwise take "name.svg" as a name.
    @router.get("/ui/lineage/{model}.svg")
    async def lineage_image(model: str, version: str | None = None) -> Response:
        svg = await run_in_threadpool(lambda: lineage_svg(lineage(), model, version))
        return Response(svg, media_type="image/svg+xml")

    @router.get("/ui/lineage/{model}", response_class=HTMLResponse)
    async def lineage_page(model: str, version: str | None = None) -> HTMLResponse:
        svg = await run_in_threadpool(lambda: lineage_svg(lineage(), model, version))
        back = f"<p><a href='/ui/models/{quote(model, safe='')}'>← {escape(model)}</a></p>"
        return page(f"lineage of {model}", f"{back}<div class='graph'>{svg}</div>")

    from mlbus.cli.ui_runs import create_router as runs_pages

    router.include_router(runs_pages(lineage, searches))
    return router


def lineage_svg(store: Any, model: str, version: str | None = None) -> str:
    """The upstream lineage of `model@version` (default: the serving one) as SVG; 404 for a
    model or version the store does not know."""
    from mlbus.consumers.lineage.graph import upstream_graph
    from mlbus.consumers.lineage.queries import LineageQueries

    up = LineageQueries(store).upstream(model, version)  # NotInLineage: 404 (mlbus/http.py)
    graph = upstream_graph(up)
    links = {}
    for node in graph.nodes:  # runs and model versions open their pages
        kind, _, name = node.partition(":")
        if kind == "run" and name != "?":
            links[node] = f"/ui/runs/{quote(name, safe='')}"
        elif kind == "model":
            links[node] = f"/ui/models/{quote(name.rpartition('@')[0], safe='')}"
    title = f"lineage of {up.model}@{up.version}"
    return render_svg(graph.nodes, graph.edges, title, links)
