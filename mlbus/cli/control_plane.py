"""The control-plane HTTP API (served by `mlbus api`, mlbus/cli/api.py): the routers of the
components under one app, with one error body for every failure: {"error": {"type": ...,
"message": ...}} (mlbus/http.py, with the status each error's class carries), optional
bearer-token auth on every mutating endpoint (`MLBUS_API_TOKEN`), and `/metrics`. The token,
a NUL byte in the path and the body's size (`api.max_body_bytes`, `api.max_upload_bytes`)
are checked by `RequestGate` before any body is read; a gzip or deflate body
(`Content-Encoding`) is inflated by it as it arrives, under the same limits.

The OpenAPI document says what the app answers (`document_api`): the token only on the
mutating operations and only when it is set, the error body and the gate's 400/413 where
they can come back. A training request names a known family and a dataset version in the
log before anything is published."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ValidationError

import mlbus
from mlbus.families import available, check_request
from mlbus.http import REF, RequestGate, bearer_guard, document_api, install_error_handlers
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.metrics import new_registry
from mlbus.schemas.training import TrainingRequested
from mlbus.services import service
from mlbus.settings import Settings
from mlbus.storage import ObjectStore

_READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})


_REFUSAL = "this endpoint changes state: send Authorization: Bearer <MLBUS_API_TOKEN>"


def _token(cfg: Settings) -> str | None:
    return cfg.api_token.get_secret_value() if cfg.api_token else None


def token_guard(cfg: Settings) -> Any:
    """Dependency: with `MLBUS_API_TOKEN` set, every mutating request needs
    `Authorization: Bearer <token>`; reading stays open. `RequestGate` refuses the same
    requests before their body is read; this is the same rule where the gate is not
    mounted."""
    return bearer_guard(_token(cfg), open_methods=_READ_ONLY, message=_REFUSAL)


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class TrainingAccepted(BaseModel):
    event_id: str
    topic: str


#: Operations that read the log or a store: the broker or store may be out of reach (503).
_BACKED = ("/datasets", "/training", "/pipelines", "/models/", "/lineage", "/runs", "/searches")


def _answered_by_the_app(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    """The statuses the app's middleware and handlers can answer an operation with, beside
    those the route declares: `RequestGate`'s 400 (a NUL byte in the path or query) where
    there are parameters, its 413 where there is a body, and the 400 and 415 of a body whose
    Content-Encoding it cannot undo, 503 where the broker or a store is used."""
    statuses = set()
    if operation.get("parameters"):
        statuses.add(400)
    if "requestBody" in operation:
        statuses |= {400, 413, 415}
    if path.startswith(_BACKED):
        statuses.add(503)
    return statuses


def openapi_document(api: FastAPI, cfg: Settings) -> dict[str, Any]:
    """The app's OpenAPI document as the app answers (`document_api`); the known model
    families listed where a training request names one."""
    doc = get_openapi(
        title=api.title, version=api.version, description=api.description, routes=api.routes
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    training = _bounded(TrainingRequested.model_json_schema(ref_template=REF))
    schemas.update(training.pop("$defs", {}))
    schemas["TrainingRequested"] = training
    training["properties"]["family"]["enum"] = available()
    token = _token(cfg)
    return document_api(
        doc,
        error_schema=ErrorBody.model_json_schema(ref_template=REF),
        guarded=(lambda method, path: method not in _READ_ONLY) if token else None,
        errors=_answered_by_the_app,
    )


class SharedProducer:
    """The API's one idempotent producer, opened on first use (its initialisation is slow
    on the embedded broker: paid once, not per request) and closed at shutdown.
    confluent-kafka producers are thread-safe; each caller flushes its own sends."""

    def __init__(self, kafka: KafkaConfig, source: str) -> None:
        self._kafka, self._source = kafka, source
        self._producer: EventProducer | None = None
        self._lock = threading.Lock()

    def get(self) -> EventProducer:
        with self._lock:
            if self._producer is None:
                self._producer = EventProducer(self._kafka, source=self._source)
            return self._producer

    @property
    def opened(self) -> bool:
        return self._producer is not None

    def close(self) -> None:
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.close()


def training_router(producer: SharedProducer, registry: Callable[[], Any]) -> APIRouter:
    """POST /training/requests: request a run (the same event `mlbus train` publishes). The
    dataset version may be a unique prefix: it is resolved here, against the log, so the
    event carries the full version (404 for an unknown or ambiguous one); the family and
    its hyperparameters are checked as the trainer will check them (400), so that a
    request that can never run is refused here, not failed later by the trainer."""
    router = APIRouter(prefix="/training", tags=["training"])

    @router.post(
        "/requests",
        status_code=202,
        summary="Request a training run",
        response_model=TrainingAccepted,
        responses={400: {}, 404: {}, 422: {}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/TrainingRequested"}
                    }
                },
            }
        },
    )
    async def request_training(http: Request) -> dict[str, str]:
        request = _training_request(await http.body())

        def publish() -> str:
            typed = request.dataset
            found = registry().get(f"{typed.name}@{typed.version}").data
            task, origin = check_request(request.family, request.task, request.hyperparameters)
            dataset = typed.model_copy(update={"version": found.version})
            shared = producer.get()
            ref = shared.publish(
                request.model_copy(
                    update={
                        "requested_by": "api",
                        "dataset": dataset,
                        "task": task,
                        "family_origin": origin,
                    }
                )
            )
            shared.flush()
            return ref.id

        return {"event_id": await run_in_threadpool(publish), "topic": "training.requested"}

    return router


def _training_request(body: bytes) -> TrainingRequested:
    """The body as a `TrainingRequested`: the contract's strict validation, except that a
    number with no fraction is an integer, as JSON (and the OpenAPI document) has it:
    `"max_epochs": 5.0` is 5. A refusal is FastAPI's 422, naming the field."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": f"not valid JSON: {e}", "type": "json_invalid"}]
        ) from None
    schema = _training_schema()
    try:
        # Validated as JSON (strict JSON mode takes an ISO 8601 string for a datetime, as
        # the document says), after the integral floats were made integers. The standard
        # library writes it back (orjson refuses integers beyond 64 bits; they are refused
        # below, naming the field).
        normalised = _integers(doc, schema, schema.get("$defs", {}))
        request = TrainingRequested.model_validate_json(json.dumps(normalised))
    except ValidationError as e:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        raise RequestValidationError(errors) from None
    # An event carries 64-bit integers (what every Kafka client's JSON reader takes).
    huge = _beyond_64_bits(request.model_dump(mode="json"), ("body",))
    if huge:
        raise RequestValidationError(
            [{"loc": huge, "msg": "an integer beyond the 64-bit range", "type": "int_range"}]
        )
    return request


@functools.cache
def _training_schema() -> dict[str, Any]:
    """TrainingRequested's JSON Schema, built once (not on every request)."""
    return TrainingRequested.model_json_schema()


def _bounded(schema: Any) -> Any:
    """`schema` with the signed 64-bit range on every integer without bounds: what an event
    can carry (`_beyond_64_bits` refuses the rest)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema.setdefault("minimum", -(2**63))
            schema.setdefault("maximum", 2**63 - 1)
        for value in schema.values():
            _bounded(value)
    elif isinstance(schema, list):
        for value in schema:
            _bounded(value)
    return schema


def _beyond_64_bits(value: Any, loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Where in `value` an integer lies beyond the signed 64-bit range, if anywhere."""
    if isinstance(value, int) and not isinstance(value, bool):
        return loc if not -(2**63) <= value < 2**63 else None
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found = _beyond_64_bits(item, (*loc, key))
        if found:
            return found
    return None


def _integers(value: Any, schema: dict[str, Any], defs: dict[str, Any]) -> Any:
    """`value` with every integral float made an int where `schema` wants an integer."""
    ref = schema.get("$ref")
    if ref:
        schema = defs.get(ref.rsplit("/", 1)[-1], {})
    options = [schema, *schema.get("anyOf", [])]
    if isinstance(value, float) and value.is_integer():
        types = {o.get("type") for o in options}
        if "integer" in types and "number" not in types:  # a float field keeps its float
            return int(value)
    elif isinstance(value, dict):
        for option in options:
            option = defs.get(option["$ref"].rsplit("/", 1)[-1], {}) if "$ref" in option else option
            if "properties" in option:
                props = option["properties"]
                return {k: _integers(v, props.get(k, {}), defs) for k, v in value.items()}
    return value


def _lazy_lineage_store(cfg: Settings) -> Any:
    """The lineage store, opened on first use (the projector creates it; the API only
    reads)."""
    opened: list[Any] = []

    def store() -> Any:
        if not opened:
            from mlbus.consumers.lineage.store import LineageStore

            opened.append(LineageStore.open(cfg.metadata_url))
        return opened[0]

    return store


def create_app(cfg: Settings) -> FastAPI:
    from mlbus.consumers.tuning.api import LazySearches
    from mlbus.datasets.api import create_router as datasets_router
    from mlbus.datasets.registry import DatasetRegistry

    producer = SharedProducer(KafkaConfig.from_settings(cfg), source=service("api").source)
    # the searches on the log, kept current by one view (GET /searches/{id} and /ui)
    searches = LazySearches(lambda: KafkaConfig.from_settings(cfg))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(producer.close)
            await run_in_threadpool(searches.close)
            for opened in registries:
                await run_in_threadpool(opened.close)

    api = FastAPI(
        title="mlbus",
        version=mlbus.__version__,
        description=__doc__,
        dependencies=[Depends(token_guard(cfg))],
        lifespan=lifespan,
    )

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = openapi_document(api, cfg)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    api.state.producer = producer
    api.add_middleware(
        RequestGate,
        max_body_bytes=cfg.api.max_body_bytes,
        max_upload_bytes=cfg.api.max_upload_bytes,
        token=_token(cfg),
        open_methods=_READ_ONLY,
        message=_REFUSAL,
    )
    registry_ = new_registry()  # with the process, platform and GC collectors
    requests = Counter(
        "mlbus_api_requests",
        "control-plane API requests",
        ["method", "route", "status"],
        registry=registry_,
    )
    latency = Histogram(
        "mlbus_api_request_duration_seconds",
        "control-plane API latency",
        ["method", "route"],
        registry=registry_,
    )

    @api.middleware("http")
    async def _measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "(unmatched)")
        requests.labels(request.method, path, str(response.status_code)).inc()
        latency.labels(request.method, path).observe(time.perf_counter() - started)
        return response

    registries: list[DatasetRegistry] = []  # one, opened on first use, closed with the app
    opening = threading.Lock()

    def registry() -> DatasetRegistry:
        with opening:
            if not registries:
                store, kafka = ObjectStore.from_settings(cfg), KafkaConfig.from_settings(cfg)
                registries.append(DatasetRegistry(store, kafka))
            return registries[0]

    from mlbus.cli.ui import create_router as ui_router
    from mlbus.consumers.lineage.api import create_router as lineage_router
    from mlbus.consumers.lineage.api import models_router, runs_router
    from mlbus.consumers.tuning.api import create_router as tuning_router
    from mlbus.consumers.workflow.api import create_router as workflow_router

    def kafka() -> KafkaConfig:
        return KafkaConfig.from_settings(cfg)

    lineage_store = _lazy_lineage_store(cfg)
    api.include_router(datasets_router(registry, cfg.limits))
    api.include_router(training_router(producer, registry))
    api.include_router(workflow_router(kafka, cfg.limits, cfg.workflow))
    api.include_router(tuning_router(searches))
    api.include_router(lineage_router(lineage_store, kafka))
    api.include_router(models_router(lineage_store))
    api.include_router(runs_router(lineage_store))
    api.include_router(ui_router(lineage_store, searches))

    install_error_handlers(api)

    @api.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": mlbus.__version__}

    @api.get("/services", tags=["meta"], summary="What `mlbus up` runs, if it runs")
    def services() -> dict[str, Any]:
        from mlbus.supervisor import read_status

        return read_status(cfg.data_dir) or {"pid": None, "services": []}

    @api.get("/metrics", tags=["meta"], include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry_), media_type=CONTENT_TYPE_LATEST)

    return api
