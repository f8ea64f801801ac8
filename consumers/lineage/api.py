"""HTTP routes of the lineage store (mounted by the control-plane app), read-only:

GET /lineage/models/{model}/upstream?version=&as_of=&format=json|dot|mermaid
GET /lineage/models/{model}/serving?as_of=          which version served (at a time)
GET /lineage/models/{model}/history?as_of=          promotions, rejections, rollbacks
GET /lineage/models/{model}/versions/{version}/why  decisions with policy and evidence
GET /lineage/datasets/{name}/downstream?version=&as_of=&format=json|dot|mermaid
GET /models                     every model, its versions and its champion (`models_router`)
GET /runs?model=&status=&sort=&limit=   training runs (`runs_router`, runs.py)
GET /runs/{run_id}              one run: request, curves, final metrics, confusion matrix…
GET /runs/compare?ids=          runs side by side (ids repeated or comma-separated)

The store is `app.state.lineage_store` (a `LineageStore`, set by the app that mounts the
router), or the one `create_router(store)` was given. Errors are raised and answered by the
app's handler (mlbus/http.py): unknown names 404 (`NotInLineage`), a bad `as_of` 422
(`InvalidTime`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from mlbus.consumers.lineage.graph import downstream_graph, to_dot, to_mermaid, upstream_graph
from mlbus.consumers.lineage.queries import LineageQueries, parse_time
from mlbus.consumers.lineage.runs import STATUSES, Comparison, RunDetail, RunQueries, RunSummary
from mlbus.consumers.lineage.store import LineageStore

Format = Literal["json", "dot", "mermaid"]
AsOf = Annotated[
    str | None,
    Query(
        description="what was known at this time (ISO 8601; naive times are UTC)",
        json_schema_extra={"format": "date-time"},
    ),
]
#: What a graph route answers, by its `format`.
GRAPH: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The graph: JSON, DOT (format=dot) or Mermaid (format=mermaid)",
        "content": {
            "text/vnd.graphviz": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    },
    404: {},
    422: {},
}
#: Unknown names (404), a bad as_of (422).
ERRORS: dict[int | str, dict[str, Any]] = {404: {}, 422: {}}


def models_router(store: Callable[[], LineageStore]) -> APIRouter:
    """GET /models, the control plane's listing, answered from the store: a request costs a
    query, not a replay of the log."""
    router = APIRouter(tags=["models"])

    @router.get("/models", summary="Every model, its versions and its champion")
    async def models() -> list[dict[str, Any]]:
        found = await run_in_threadpool(lambda: LineageQueries(store()).models())
        return [asdict(m) for m in found]

    return router


RunStatus = Literal["requested", "running", "completed", "failed"]
assert set(get_args(RunStatus)) == set(STATUSES)


def runs_router(store: Callable[[], LineageStore]) -> APIRouter:
    """GET /runs, /runs/compare, /runs/{run_id}: experiments, answered from the store's
    projection of the training topics. A run is named by its id, a unique prefix of it, or
    `model@version` (the run that produced the version)."""
    router = APIRouter(prefix="/runs", tags=["runs"])

    @router.get("", summary="Training runs, newest first or best first by a metric")
    async def runs(
        model: str | None = None,
        status: RunStatus | None = None,
        sort: Annotated[
            str | None,
            Query(description="a metric (e.g. test.accuracy, test.rmse): best run first"),
        ] = None,
        limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
    ) -> list[RunSummary]:
        return await run_in_threadpool(
            lambda: RunQueries(store()).list(model, status, sort=sort, limit=limit)
        )

    # Declared before `/runs/{run_id}`, which would otherwise take "compare" for a run id.
    @router.get(
        "/compare",
        summary="Runs side by side: hyperparameters, metrics, learning curves",
        responses={404: {}, 422: {}},
    )
    async def compare(
        ids: Annotated[
            list[str],
            Query(description="the runs: repeated, or comma-separated", min_length=1),
        ],
    ) -> Comparison:
        refs = [part for item in ids for part in item.split(",") if part.strip()]
        return await run_in_threadpool(lambda: RunQueries(store()).compare(refs))

    @router.get("/{run_id}", summary="One training run", responses={404: {}, 422: {}})
    async def run(run_id: str) -> RunDetail:
        return await run_in_threadpool(lambda: RunQueries(store()).show(run_id))

    return router


def create_router(store: Callable[[], LineageStore] | None = None) -> APIRouter:
    router = APIRouter(prefix="/lineage", tags=["lineage"])

    def queries(request: Request) -> LineageQueries:
        found = store() if store is not None else getattr(request.app.state, "lineage_store", None)
        if found is None:
            raise HTTPException(503, "no lineage store configured (app.state.lineage_store)")
        return LineageQueries(found)

    async def answer(call: Callable[[], Any]) -> Any:
        return await run_in_threadpool(call)

    def graph(result: Any, kind: Format, build: Callable[[Any], Any]) -> Any:
        if kind == "dot":
            return PlainTextResponse(to_dot(build(result)), media_type="text/vnd.graphviz")
        if kind == "mermaid":
            return PlainTextResponse(to_mermaid(build(result)), media_type="text/plain")
        return asdict(result)

    @router.get(
        "/models/{model}/upstream", summary="Upstream lineage of a model version", responses=GRAPH
    )
    async def upstream(
        request: Request,
        model: str,
        version: str | None = None,
        as_of: AsOf = None,
        format: Format = "json",
    ) -> Any:
        q = queries(request)
        result = await answer(lambda: q.upstream(model, version, parse_time(as_of)))
        return graph(result, format, upstream_graph)

    @router.get(
        "/models/{model}/serving", summary="The version serving (at a time)", responses=ERRORS
    )
    async def serving(request: Request, model: str, as_of: AsOf = None) -> dict[str, Any]:
        q = queries(request)
        version = await answer(lambda: q.serving(model, parse_time(as_of)))
        return {"model": model, "as_of": as_of, "version": version}

    @router.get(
        "/models/{model}/history", summary="Promotions, rejections and rollbacks", responses=ERRORS
    )
    async def history(request: Request, model: str, as_of: AsOf = None) -> list[Any]:
        q = queries(request)
        result = await answer(lambda: q.history(model, parse_time(as_of)))
        return [asdict(d) for d in result]

    @router.get(
        "/models/{model}/versions/{version}/why",
        summary="Why promoted or rejected",
        responses=ERRORS,
    )
    async def why(request: Request, model: str, version: str, as_of: AsOf = None) -> dict[str, Any]:
        q = queries(request)
        return asdict(await answer(lambda: q.why(model, version, parse_time(as_of))))

    @router.get(
        "/datasets/{name}/downstream",
        summary="What used a dataset, and where it serves",
        responses=GRAPH,
    )
    async def downstream(
        request: Request,
        name: str,
        version: str | None = None,
        as_of: AsOf = None,
        format: Format = "json",
    ) -> Any:
        q = queries(request)
        result = await answer(lambda: q.downstream(name, version, parse_time(as_of)))
        return graph(result, format, downstream_graph)

    return router


#: The router to mount: `api.state.lineage_store = LineageStore.open(settings.metadata_url)`
#: then `api.include_router(router)`.
router = create_router()
