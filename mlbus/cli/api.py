"""The control-plane HTTP API (`mlbus api`): the routers of the components under one app,
with one error body for every failure: {"error": {"type": ..., "message": ...}}."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import mlbus
from mlbus.cli.common import app, settings
from mlbus.errors import (
    BrokerNotRunning,
    InvalidEvent,
    MlbusError,
    TransientError,
    UnknownTopic,
)
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings
from mlbus.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)


def _status(error: MlbusError) -> int:
    from datasets.registry import UnknownDataset
    from datasets.sources import InvalidDataset

    if isinstance(error, UnknownDataset | UnknownTopic):
        return 404
    if isinstance(error, InvalidDataset | InvalidEvent | StorageError):
        return 400
    if isinstance(error, TransientError | BrokerNotRunning):
        return 503
    return 500


def error_body(kind: str, message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


def create_app(cfg: Settings) -> FastAPI:
    from datasets.api import create_router as datasets_router
    from datasets.registry import DatasetRegistry

    api = FastAPI(title="mlbus", version=mlbus.__version__, description=__doc__)

    def registry() -> DatasetRegistry:
        return DatasetRegistry(ObjectStore.from_settings(cfg), KafkaConfig.from_settings(cfg))

    api.include_router(datasets_router(registry))

    @api.exception_handler(MlbusError)
    async def _mlbus_error(request: Request, error: MlbusError) -> JSONResponse:
        return error_body(type(error).__name__, str(error), _status(error))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return error_body("InvalidRequest", f"{where}: {first['msg']}", 422)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_body("InternalError", f"{type(error).__name__}: {error}", 500)

    @api.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok", "version": mlbus.__version__}

    return api


@app.command("api")
def serve_api(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
) -> None:
    """Run the control-plane HTTP API (OpenAPI document at /docs and /openapi.json)."""
    import uvicorn

    uvicorn.run(create_app(settings()), host=host, port=port, log_level="info")
