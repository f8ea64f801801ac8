"""HTTP routes of the lineage store (mounted by the control-plane app), read-only:

GET /lineage/models/{model}/upstream?version=&as_of=&format=json|dot|mermaid
GET /lineage/models/{model}/serving?as_of=          which version served (at a time)
GET /lineage/models/{model}/history?as_of=          promotions, rejections, rollbacks
GET /lineage/models/{model}/versions/{version}/why  decisions with policy and evidence, and
                                                    its rollouts as a candidate
GET /lineage/models/{model}/rollouts?as_of=         rollouts: each change of the split, why
GET /lineage/models/{model}/split?as_of=            the weights by version in force (at a time)
GET /lineage/requests/{request_id}?model=&since=&verify=   which version answered a request,
                                                    its part then (stable, candidate, shadow),
                                                    the rollout and promotion behind it
GET /lineage/datasets/{name}/downstream?version=&as_of=&format=json|dot|mermaid
GET /models                     every model, its versions and its champion (`models_router`)
GET /runs?model=&status=&sort=&limit=   training runs (`runs_router`, runs.py)
GET /runs/{run_id}              one run: request, curves, final metrics, confusion matrix…
GET /runs/compare?ids=          runs side by side (ids repeated or comma-separated)

The store is `app.state.lineage_store` (a `LineageStore`, set by the app that mounts the
router), or the one `create_router(store)` was given. A request's audit reads
`inference.logged` (not projected) from the log of `create_router(..., kafka=)`, joining no
group. Errors are raised and answered by the
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
from mlbus.consumers.lineage.rollouts import RolloutQueries
from mlbus.consumers.lineage.runs import STATUSES, Comparison, RunDetail, RunQueries, RunSummary
from mlbus.consumers.lineage.store import LineageStore, NotInLineage
from mlbus.kafka.config import KafkaConfig

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


def create_router(
    store: Callable[[], LineageStore] | None = None,
    kafka: Callable[[], KafkaConfig] | None = None,
) -> APIRouter:
    router = APIRouter(prefix="/lineage", tags=["lineage"])

    def opened(request: Request) -> LineageStore:
        found = store() if store is not None else getattr(request.app.state, "lineage_store", None)
        if found is None:
            raise HTTPException(503, "no lineage store configured (app.state.lineage_store)")
        return found

    def queries(request: Request) -> LineageQueries:
        return LineageQueries(opened(request))

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
        store = opened(request)
        when = parse_time(as_of)

        def both() -> dict[str, Any]:
            found = LineageQueries(store).why(model, version, when)
            rolled = RolloutQueries(store).rollouts(model, when)
            mine = [rollout_json(r) for r in rolled if r.candidate == version]
            return asdict(found) | {"rollouts": mine}

        return await answer(both)

    @router.get(
        "/models/{model}/rollouts",
        summary="Rollouts: every change of the split, with weights, actor, reason, analysis",
        responses=ERRORS,
    )
    async def rollouts(request: Request, model: str, as_of: AsOf = None) -> list[Any]:
        q = RolloutQueries(opened(request))
        found = await answer(lambda: q.rollouts(model, parse_time(as_of)))
        return [rollout_json(r) for r in found]

    @router.get("/models/{model}/split", summary="The split in force (at a time)", responses=ERRORS)
    async def split(request: Request, model: str, as_of: AsOf = None) -> dict[str, Any]:
        q = RolloutQueries(opened(request))
        return split_json(await answer(lambda: q.split(model, parse_time(as_of))))

    @router.get(
        "/requests/{request_id}",
        summary="Which version answered a request, as what, and who decided it",
        responses={404: {}, 422: {}, 503: {}},
    )
    async def request_audit(
        request: Request,
        request_id: str,
        model: str | None = None,
        since: AsOf = None,
        verify: bool = True,
    ) -> dict[str, Any]:
        from mlbus.consumers.lineage import audit
        from mlbus.kafka.reader import read_log

        if kafka is None:
            raise HTTPException(503, "no log configured for request audits")
        found = opened(request)
        start = parse_time(since)
        since_ms = int(start.timestamp() * 1000) if start is not None else None

        def run() -> audit.RequestAudit:
            logged = read_log(kafka(), audit.REQUEST_TOPICS, since_ms=since_ms)
            done = audit.request_plan(found, request_id, logged, model)
            if not done.answers:
                raise NotInLineage(f"no inference.logged record of request {request_id!r}")
            if verify and done.report is not None:
                audit.verify(done.report, read_log(kafka(), audit.topics_of(done.report)))
            return done

        return request_json(await answer(run))

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


def change_json(c: Any) -> dict[str, Any]:
    return asdict(c) | {"summary": c.summary()}


def rollout_json(r: Any) -> dict[str, Any]:
    return asdict(r) | {"changes": [change_json(c) for c in r.changes]}


def split_json(s: Any) -> dict[str, Any]:
    return asdict(s) | {"change": change_json(s.change) if s.change is not None else None}


def request_json(done: Any) -> dict[str, Any]:
    """A request's audit as JSON (the API's answer and `mlbus audit --request --json`)."""
    answers = []
    for a in done.answers:
        served = a.served
        answers.append(
            asdict(a)
            | {
                "served": asdict(served)
                | {
                    "split": split_json(served.split),
                    "rollout": rollout_json(served.rollout) if served.rollout else None,
                }
            }
        )
    report = done.report
    return {
        "request_id": done.request_id,
        "ok": done.ok,
        "answers": answers,
        "events": [asdict(e) for e in report.events] if report else [],
        "counts": report.counts if report else {},
    }


#: The router to mount: `api.state.lineage_store = LineageStore.open(settings.metadata_url)`
#: then `api.include_router(router)`.
router = create_router()
