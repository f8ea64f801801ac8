"""The control-plane HTTP API (served by `mlbus api`, mlbus/cli/api.py): the routers of the
components under one app, with one error body for every failure: {"error": {"type": ...,
"message": ...}} (mlbus/http.py, with the status each error's class carries), optional
bearer-token auth on every mutating endpoint (`MLBUS_API_TOKEN`), and `/metrics`. The token,
a NUL byte in the path and the body's size (`api.max_body_bytes`, `api.max_upload_bytes`)
are checked by `RequestGate` before any body is read."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

import mlbus
from mlbus.http import RequestGate, bearer_guard, install_error_handlers
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
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
    requests before their body is read; the dependency documents the scheme in OpenAPI."""
    return bearer_guard(_token(cfg), open_methods=_READ_ONLY, message=_REFUSAL)


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
    event carries the full version (404 for an unknown or ambiguous one)."""
    router = APIRouter(prefix="/training", tags=["training"])

    @router.post("/requests", status_code=202, summary="Request a training run")
    async def request_training(request: TrainingRequested) -> dict[str, str]:
        def publish() -> str:
            typed = request.dataset
            found = registry().get(f"{typed.name}@{typed.version}").data
            dataset = typed.model_copy(update={"version": found.version})
            shared = producer.get()
            ref = shared.publish(
                request.model_copy(update={"requested_by": "api", "dataset": dataset})
            )
            shared.flush()
            return ref.id

        return {"event_id": await run_in_threadpool(publish), "topic": "training.requested"}

    return router


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
    from mlbus.datasets.api import create_router as datasets_router
    from mlbus.datasets.registry import DatasetRegistry

    producer = SharedProducer(KafkaConfig.from_settings(cfg), source=service("api").source)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(producer.close)
            for opened in registries:
                await run_in_threadpool(opened.close)

    api = FastAPI(
        title="mlbus",
        version=mlbus.__version__,
        description=__doc__,
        dependencies=[Depends(token_guard(cfg))],
        lifespan=lifespan,
    )
    api.state.producer = producer
    api.add_middleware(
        RequestGate,
        max_body_bytes=cfg.api.max_body_bytes,
        max_upload_bytes=cfg.api.max_upload_bytes,
        token=_token(cfg),
        open_methods=_READ_ONLY,
        message=_REFUSAL,
    )
    registry_ = CollectorRegistry()
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
    from mlbus.consumers.lineage.api import models_router
    from mlbus.consumers.workflow.api import create_router as workflow_router

    def kafka() -> KafkaConfig:
        return KafkaConfig.from_settings(cfg)

    lineage_store = _lazy_lineage_store(cfg)
    api.include_router(datasets_router(registry, cfg.limits))
    api.include_router(training_router(producer, registry))
    api.include_router(workflow_router(kafka, cfg.limits))
    api.include_router(lineage_router(lineage_store))
    api.include_router(models_router(lineage_store))
    api.include_router(ui_router(lineage_store))

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
