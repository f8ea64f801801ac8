"""HTTP routes of the workflow manager (mounted by the control-plane app):

GET  /pipelines                      every pipeline's revision in force
POST /pipelines                      body: the YAML file (or JSON {"definition", "actor"});
                                     201 new revision, 200 unchanged, 400 naming the line
POST /models/{model}/promote         JSON {"version", "reason", "actor"?, and for a rollout
                                     "strategy": canary|shadow|ab, "weight"?, "weights"?,
                                     "steps"?, "min_samples"?}: 201
POST /models/{model}/rollback        JSON {"reason", "to"?, "actor"?}: 201
POST /models/{model}/abort           JSON {"reason", "actor"?}: 201, the rollout aborted
GET  /models/{model}/traffic         the newest model.traffic event (404: none), and while its
                                     rollout is in progress, `comparison`: each version's
                                     figures so far in the current step by the canary's
                                     analysis (nothing is decided or published from it)

`GET /models` is not here: the listing is a query of the lineage store, which the control
plane mounts next to these routes.

Errors are raised, and answered by the app's handler (mlbus/http.py) with the status
their class carries: `InvalidPipeline` and `InvalidRollout` 400, `UnknownModel` 404,
`NothingToRollBack` and `RolloutConflict` 409.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mlbus.consumers.workflow import commands, definitions
from mlbus.errors import UnknownModel
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.traffic import TrafficCriteria
from mlbus.settings import LimitsSettings, WorkflowSettings


def criteria_of(settings: WorkflowSettings, min_samples: int | None = None) -> TrafficCriteria:
    """A rollout's criteria: the workflow settings', `min_samples` if given."""
    return TrafficCriteria(
        min_samples=min_samples or settings.rollout_min_samples,
        confidence=settings.rollout_confidence,
        max_error_ratio=settings.rollout_max_error_ratio,
        max_latency_ratio=settings.rollout_max_latency_ratio,
        min_labelled=settings.rollout_min_labelled,
    )


class Promote(BaseModel):
    version: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    actor: str = Field(default="http", min_length=1)
    strategy: Literal["canary", "shadow", "ab"] | None = Field(
        default=None, description="roll the version out instead of promoting it at once"
    )
    weight: int | None = Field(
        default=None, description="the candidate's percent of requests (canary: first step)"
    )
    weights: dict[str, int] | None = Field(
        default=None, description="percent by version (the serving one and the candidate)"
    )
    steps: list[int] | None = Field(
        default=None, description="a canary's candidate weights, ascending, ending at 100"
    )
    min_samples: int | None = Field(
        default=None, ge=1, description="candidate requests a canary step needs"
    )


class Abort(BaseModel):
    reason: str = Field(min_length=1)
    actor: str = Field(default="http", min_length=1)


class Rollback(BaseModel):
    reason: str = Field(min_length=1)
    to: str | None = None
    actor: str = Field(default="http", min_length=1)


#: The request body, as the route reads it (OpenAPI).
PIPELINE_BODY = {
    "required": True,
    "content": {
        "application/yaml": {"schema": {"type": "string", "description": "the pipeline file"}},
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["definition"],
                "properties": {
                    "definition": {"type": "string", "description": "the pipeline file"},
                    "actor": {"type": "string"},
                },
            }
        },
    },
}


def _event(event: Any) -> dict[str, Any]:
    return {"event_id": event.id, "type": event.type, **event.data.model_dump(mode="json")}


def comparison_json(decision: Any) -> dict[str, Any]:
    """A rollout's comparison so far: what the step's analysis finds (`verdict` is what a
    canary's step would do; a shadow or an A/B experiment ends only by hand) and the figures."""
    return {"verdict": decision.verdict, "reason": decision.reason, **decision.analysis}


def create_router(
    kafka: Callable[[], KafkaConfig],
    limits: LimitsSettings | None = None,
    workflow: WorkflowSettings | None = None,
) -> APIRouter:
    """The routes; pipeline files are checked against `limits` (the defaults unless given);
    a rollout's criteria default to `workflow`'s."""
    router = APIRouter(tags=["workflow"])
    defaults = workflow or WorkflowSettings()

    @router.get("/pipelines", summary="Every pipeline's revision in force")
    def pipelines() -> list[dict[str, Any]]:
        return commands.list_pipelines(kafka())

    @router.post(
        "/pipelines",
        summary="Apply a pipeline definition (YAML)",
        status_code=201,
        responses={200: {"description": "Unchanged: the revision in force"}, 400: {}},
        openapi_extra={"requestBody": PIPELINE_BODY},
    )
    async def apply(request: Request) -> JSONResponse:
        body = await request.body()
        actor = request.headers.get("x-mlbus-actor", "http")
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                fields = orjson.loads(body)
                text, actor = str(fields["definition"]), str(fields.get("actor", actor))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                raise definitions.InvalidPipeline('JSON body needs "definition"') from None
        else:
            text = body.decode("utf-8", errors="replace")
        applied = await run_in_threadpool(
            definitions.apply, kafka(), text, source="request body", actor=actor, limits=limits
        )
        return JSONResponse(
            {
                "published": applied.published,
                "event_id": applied.event_id,
                "message": applied.message,
                "revision": applied.pipeline.revision,
            },
            status_code=201 if applied.published else 200,
        )

    @router.post(
        "/models/{model}/promote",
        status_code=201,
        summary="Promote a version by hand, or start its rollout (canary, shadow, A/B)",
        responses={400: {}, 404: {}, 409: {}, 422: {}},
    )
    def promote(model: str, body: Promote) -> Any:
        criteria = None
        if body.strategy is not None:
            criteria = criteria_of(defaults, body.min_samples)
        elif body.min_samples is not None:
            raise commands.InvalidRollout("min_samples needs a strategy")
        event = commands.promote(
            kafka(),
            model,
            body.version,
            reason=body.reason,
            actor=body.actor,
            strategy=body.strategy,
            weight=body.weight,
            weights=body.weights,
            steps=body.steps,
            criteria=criteria,
        )
        return _event(event)

    @router.post(
        "/models/{model}/abort",
        status_code=201,
        summary="Abort the rollout in progress: all traffic back to the serving version",
        responses={404: {}, 409: {}, 422: {}},
    )
    def abort(model: str, body: Abort) -> Any:
        return _event(commands.abort(kafka(), model, reason=body.reason, actor=body.actor))

    @router.get(
        "/models/{model}/traffic",
        summary="The model's newest traffic split (model.traffic)",
        responses={404: {}},
    )
    def traffic(model: str) -> Any:
        config = kafka()
        event = commands.traffic(config, model)
        if event is None:
            raise UnknownModel(f"model {model} has never had a rollout")
        compared = commands.comparison(config, event)
        body = _event(event)
        body["comparison"] = None if compared is None else comparison_json(compared)
        return body

    @router.post(
        "/models/{model}/rollback",
        status_code=201,
        summary="Roll back by hand",
        responses={404: {}, 409: {}, 422: {}},
    )
    def rollback(model: str, body: Rollback) -> Any:
        event = commands.rollback(kafka(), model, to=body.to, reason=body.reason, actor=body.actor)
        return _event(event)

    return router
