"""The HTTP face of a serving replica: Open Inference Protocol v2 (health, server and model
metadata, infer, versioned infer), the OIP model-repository control endpoints (bearer token
when `api_token` is set), `/metrics` for Prometheus, and `POST /v2/models/{name}/feedback`
for delayed labels (serving/feedback.py).

Every refusal is a 4xx with the OIP error body `{"error": message, "type": kind}`; the
infer body is read with a size limit (on its inflated size when it comes gzip- or
deflate-encoded) and parsed with orjson (serving/tensors.py), not by FastAPI's validation,
and the OpenAPI document describes it from the models below. Tensors may come and go as
JSON or as binary data after it (the binary tensor extension, tritonclient's default).

`POST .../infer` is answered by a plain ASGI middleware (`InferFastPath`) ahead of FastAPI's
routing, request objects and dependency resolution, a large share of the event loop's time
per request under load (docs/serving.md); FastAPI answers everything else and
documents the infer routes, which answer the same way when reached.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal, NamedTuple

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

import mlbus
from mlbus.errors import MlbusError, UnknownModel
from mlbus.http import (
    REF,
    bearer_guard,
    check_length,
    counted,
    decode_content,
    document_api,
    header,
    install_error_handlers,
)
from mlbus.schemas.envelope import new_event_id
from mlbus.serving.errors import MalformedRequest, NotReady, VerificationFailed
from mlbus.serving.feedback import FeedbackAccepted, FeedbackRequest
from mlbus.serving.feedback import check as check_feedback
from mlbus.serving.feedback import parse as parse_feedback
from mlbus.serving.registry import Deployment
from mlbus.serving.server import ModelServer
from mlbus.serving.tensors import decode_request, dumps, encode_response, outputs, parse_body

# -- documented shapes (OpenAPI); requests are parsed by serving/tensors.py ----------------


class InputParameters(BaseModel):
    binary_data_size: int | None = Field(
        default=None,
        ge=0,
        description="binary tensor extension: the tensor's values are this many bytes after "
        "the JSON object (little-endian, row-major); the request then has the header "
        "Inference-Header-Content-Length (the JSON object's length)",
    )


class TensorIn(BaseModel):
    name: str = Field(examples=["input"], description="the model's input: 'input'")
    shape: list[int] = Field(
        description="[batch, features]; 1 <= batch <= serving.max_rows_per_request (else 413)"
    )
    datatype: Literal[
        "FP16",
        "FP32",
        "FP64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
    ]
    data: list[float] | None = Field(
        default=None,
        description="row-major flat values, finite numbers only; absent when the values "
        "come as binary data after the JSON object (parameters.binary_data_size)",
    )
    parameters: InputParameters | None = None


class OutputParameters(BaseModel):
    binary_data: bool | None = Field(
        default=None, description="answer this output as binary data after the JSON object"
    )


class OutputRequest(BaseModel):
    name: Literal["label", "probabilities"]
    parameters: OutputParameters | None = None


class RequestParameters(BaseModel):
    binary_data_output: bool | None = Field(
        default=None,
        description="answer every output without its own binary_data parameter as binary data",
    )
    routing_key: str | None = Field(
        default=None,
        description="during a rollout (model.traffic), requests with one key always land on "
        "one version (as the header X-Mlbus-Routing-Key; default: the request id)",
    )


class InferRequest(BaseModel):
    id: str | None = Field(
        default=None,
        description="answered and logged with the result; over serving.max_request_id_bytes "
        "bytes is a 400 (none: one is generated)",
    )
    inputs: list[TensorIn] = Field(min_length=1, max_length=1)
    outputs: list[OutputRequest] | None = Field(default=None, description="default: both")
    parameters: RequestParameters | None = None


class OutputParametersOut(BaseModel):
    binary_data_size: int = Field(description="the output's bytes after the JSON object")


class TensorOut(BaseModel):
    name: Literal["label", "probabilities"]
    shape: list[int]
    datatype: Literal["BYTES", "FP32"]
    data: list[float | str] | None = Field(
        default=None, description="absent when the output is answered as binary data"
    )
    parameters: OutputParametersOut | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str
    outputs: list[TensorOut]


class ErrorBody(BaseModel):
    error: str
    type: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="loaded versions; the first one is the champion")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        description="from the model card: family, features, classes, label, dataset, run_id"
    )


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    version: str | None = Field(default=None, description="for a version's ready endpoint")
    ready: bool


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY"]
    reason: str = ""


def control_route(method: str, path: str) -> bool:
    """Whether an operation is a control endpoint (the bearer token, when set)."""
    return path.startswith("/v2/repository/")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody} for s in statuses}


BINARY_BODY = {"type": "string", "format": "binary"}
JSON_LENGTH_HEADER = {
    "description": "with binary outputs (application/octet-stream): the length of the JSON "
    "object the outputs' binary data follows",
    "schema": {"type": "integer", "minimum": 0},
}
RETRY_AFTER_HEADER = {"description": "seconds to wait", "schema": {"type": "integer"}}


def oip_body(kind: str, message: str) -> dict[str, Any]:
    """The error body of every answer: OIP's `{"error": message}`, plus the error's kind."""
    return {"error": message, "type": kind}


def error_body(error: MlbusError) -> bytes:
    return dumps(oip_body(type(error).__name__, str(error)))


class ClientGone(Exception):
    """The client disconnected before its request body was read: nobody to answer."""


async def receive_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The body from the ASGI messages themselves, with the kernel's limit (mlbus/http.py):
    the declared length checked first, then the bytes counted as they arrive."""
    check_length(header(scope, b"content-length"), limit)
    receive = counted(receive, limit)
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Payload(NamedTuple):
    """An infer request's body, inflated, its `Inference-Header-Content-Length`, and its
    routing key header (`X-Mlbus-Routing-Key`)."""

    content: bytes
    json_length: bytes | None = None
    routing_key: bytes | None = None


#: The header that names the caller during a rollout: requests with one key always land on
#: one version (the request parameter `routing_key` does the same inside the JSON object).
ROUTING_HEADER = "X-Mlbus-Routing-Key"
ROUTING_PARAMETER = "routing_key"


async def receive_payload(scope: Scope, receive: Receive, limit: int) -> Payload:
    """The body (`receive_body`) with its Content-Encoding undone, the inflated size under
    the same limit, the binary tensor extension's header and the routing key."""
    raw = await receive_body(scope, receive, limit)
    content = decode_content(raw, header(scope, b"content-encoding"), limit)
    return Payload(
        content,
        header(scope, b"inference-header-content-length"),
        header(scope, ROUTING_HEADER.lower().encode()),
    )


def routing_key(doc: Any, payload: Payload, max_bytes: int) -> tuple[str, str | None]:
    """The key a request is routed by during a rollout, and the request id when the request
    names one: the routing header, else the `routing_key` request parameter, else the
    request id; a request with none gets a new id, which is then its key and its id."""
    given = doc.get("id") if isinstance(doc, dict) else None
    request_id = given if isinstance(given, str) else None
    key: str | None = None
    if payload.routing_key is not None:
        key = payload.routing_key.decode("utf-8", "replace")
    else:
        parameters = doc.get("parameters") if isinstance(doc, dict) else None
        value = parameters.get(ROUTING_PARAMETER) if isinstance(parameters, dict) else None
        if value is not None and not isinstance(value, str):
            raise MalformedRequest(f"the request parameter {ROUTING_PARAMETER!r} must be a string")
        key = value
    if key is None:  # the request id (checked with the request), or a new one
        if request_id is None:
            request_id = new_event_id()
        return request_id, request_id
    if len(key) * 4 > max_bytes and len(key.encode("utf-8", "replace")) > max_bytes:
        raise MalformedRequest(
            f"the routing key is over {max_bytes} bytes (serving.max_request_id_bytes)"
        )
    return key, request_id


class Answer(NamedTuple):
    """An infer answer: its status, body and, when binary data follows the JSON object,
    that object's length."""

    status: int
    body: bytes
    json_length: int | None = None


#: The OIP infer routes: /v2/models/{name}/infer and /v2/models/{name}/versions/{v}/infer.
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
Infer = Callable[[str, str | None, Callable[[], Awaitable[Payload]]], Awaitable[Answer]]
_JSON = (b"content-type", b"application/json")
_BINARY = (b"content-type", b"application/octet-stream")
#: The binary tensor extension's header: the length of the JSON object that binary data
#: follows (request and response).
JSON_LENGTH = "Inference-Header-Content-Length"
#: Seconds a client is asked to wait before trying again after a 503 (the model is loading,
#: or the server is catching up with model.promoted).
RETRY_AFTER = 1


def headers_of(status: int, json_length: int | None = None) -> list[tuple[bytes, bytes]]:
    """The headers of an infer answer besides its length: JSON (or binary data after the
    JSON object, with its length), and `Retry-After` on a 503."""
    if json_length is not None:
        return [_BINARY, (JSON_LENGTH.lower().encode(), b"%d" % json_length)]
    if status == 503:
        return [_JSON, (b"retry-after", b"%d" % RETRY_AFTER)]
    return [_JSON]


class InferFastPath:
    """ASGI middleware: answers `POST` on the infer routes with `infer` (status and JSON
    body); passes every other request on to `app`. An unexpected error propagates to the
    app's error middleware, which answers 500 as for any route."""

    def __init__(self, app: ASGIApp, infer: Infer, limit: int) -> None:
        self.app = app
        self.infer = infer
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):  # mounted under a prefix, as Starlette routes it
            path = path[len(root) :]
        match = INFER_PATH.fullmatch(path)
        if match is None:
            return await self.app(scope, receive, send)
        try:
            status, body, json_length = await self.infer(
                match[1], match[2], lambda: receive_payload(scope, receive, self.limit)
            )
        except ClientGone:
            return
        headers = headers_of(status, json_length)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


def model_metadata(name: str, deployments: list[Deployment]) -> dict[str, Any]:
    d = deployments[0]
    card = d.card
    meta = d.metadata()
    return {
        "name": name,
        "versions": [x.version for x in deployments],
        "platform": "pytorch_safetensors",
        "inputs": meta["inputs"],
        "outputs": meta["outputs"],
        "parameters": {
            "version": d.version,
            "family": card.family,
            "features": d.features,
            "feature_types": card.feature_types,
            "label": card.label,
            "classes": d.classes.tolist(),
            "task": card.task or "classification",
            "family_origin": card.family_origin.model_dump() if card.family_origin else None,
            "dataset": card.dataset.model_dump() if card.dataset else None,
            "run_id": card.run_id,
            "artifact_sha256": d.sha256,
        },
    }


def create_app(server: ModelServer) -> FastAPI:
    limit = server.config.max_body_bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(
        title="mlbus model server",
        version=mlbus.__version__,
        description=__doc__,
        lifespan=lifespan,
    )

    install_error_handlers(app, body=oip_body)
    control = bearer_guard(
        server.api_token, message="this control endpoint needs 'Authorization: Bearer <token>'"
    )

    # -- health and metadata ---------------------------------------------------------------

    @app.get("/v2", response_model=ServerMetadata, tags=["oip"])
    def server_metadata() -> dict[str, Any]:
        return {
            "name": "mlbus",
            "version": mlbus.__version__,
            "extensions": ["binary_tensor_data", "model_repository", "kafka_inference", "metrics"],
        }

    # HEAD as well: probes and load balancers ask for the status alone.
    @app.head("/v2/health/live", response_model=Live, tags=["oip"])
    @app.get("/v2/health/live", response_model=Live, tags=["oip"])
    def live() -> dict[str, bool]:
        return {"live": True}

    ready_doc: dict[str, Any] = {
        "response_model": Ready,
        "tags": ["oip"],
        "responses": {503: {"model": Ready, "description": "Not caught up yet"}},
    }

    @app.head("/v2/health/ready", **ready_doc)
    @app.get("/v2/health/ready", **ready_doc)
    def ready() -> Response:
        """Ready once caught up with `model.promoted`: each model serves the newest version
        that loads, and what cannot load is reported failed (deployment.updated)."""
        return JSONResponse({"ready": server.ready}, 200 if server.ready else 503)

    @app.get(
        "/v2/models/{name}", response_model=ModelMetadata, tags=["oip"], responses=_errors(404)
    )
    def metadata(name: str) -> dict[str, Any]:
        slot = server.registry.slot(name)
        return model_metadata(name, slot.deployments())

    @app.get(
        "/v2/models/{name}/versions/{version}",
        response_model=ModelMetadata,
        tags=["oip"],
        responses=_errors(404),
    )
    def version_metadata(name: str, version: str) -> dict[str, Any]:
        return model_metadata(name, [server.registry.get(name, version)])

    @app.get(
        "/v2/models/{name}/ready",
        response_model=ModelReady,
        response_model_exclude_none=True,
        tags=["oip"],
        responses=_errors(404),
    )
    def model_ready(name: str) -> dict[str, Any]:
        server.registry.slot(name)
        return {"name": name, "ready": True}

    @app.get(
        "/v2/models/{name}/versions/{version}/ready",
        response_model=ModelReady,
        tags=["oip"],
        responses=_errors(404),
    )
    def version_ready(name: str, version: str) -> dict[str, Any]:
        server.registry.get(name, version)
        return {"name": name, "version": version, "ready": True}

    # -- inference -------------------------------------------------------------------------

    async def infer(
        name: str, version: str | None, read: Callable[[], Awaitable[Payload]]
    ) -> Answer:
        """One inference request: its status and body (`read` reads the request body)."""
        started = time.perf_counter()
        deployment = x = request_id = None
        try:
            payload = await read()
            doc, binary = parse_body(payload.content, payload.json_length)
            key, request_id = routing_key(doc, payload, server.config.max_request_id_bytes)
            deployment, shadow = server.route(name, version, key)
            decoded = decode_request(
                doc,
                deployment,
                binary,
                max_rows=server.config.max_rows_per_request,
                max_id_bytes=server.config.max_request_id_bytes,
            )
            # One id for the response and the inference log, so the two can be joined.
            x, request_id = decoded.x, decoded.id or request_id or new_event_id()
            answer = await server.infer(
                deployment,
                x,
                protocol="http",
                request_id=request_id,
                started=started,
                shadow=shadow,
            )
        except MlbusError as e:  # a refusal (unknown model, bad input, too large, not ready)
            server.failed(name, "http", type(e).__name__, started, deployment, x, e, request_id)
            return Answer(e.status, error_body(e))
        tensors, _ = outputs(
            answer.deployment, answer.probabilities, decoded.outputs, answer.labels
        )
        doc = {
            "model_name": name,
            "model_version": answer.deployment.version,
            "id": request_id,
            "outputs": tensors,
        }
        return Answer(200, *encode_response(doc, decoded.binary))

    async def read_payload(request: Request) -> Payload:
        return await receive_payload(request.scope, request.receive, limit)

    async def infer_route(name: str, version: str | None, request: Request) -> Response:
        status, body, json_length = await infer(name, version, lambda: read_payload(request))
        headers = {k.decode(): v.decode() for k, v in headers_of(status, json_length)}
        return Response(body, status_code=status, headers=headers)

    app.add_middleware(InferFastPath, infer=infer, limit=limit)

    infer_doc: dict[str, Any] = {
        "response_model": InferResponse,
        "tags": ["oip"],
        "responses": {
            200: {
                "description": "The outputs: JSON, or JSON followed by binary data",
                "content": {"application/octet-stream": {"schema": BINARY_BODY}},
                "headers": {JSON_LENGTH: JSON_LENGTH_HEADER},
            },
            **_errors(400, 404, 413, 415),
            503: {"model": ErrorBody, "headers": {"Retry-After": RETRY_AFTER_HEADER}},
        },
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "description": "The request as JSON; with the header "
                "Inference-Header-Content-Length, binary tensor data follows the JSON object "
                "(application/octet-stream). Content-Encoding gzip or deflate is accepted.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}
                },
            }
        },
    }

    @app.post("/v2/models/{name}/infer", **infer_doc)
    async def infer_champion(name: str, request: Request) -> Response:
        """Infer with the serving champion; the response names the version that answered."""
        return await infer_route(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", **infer_doc)
    async def infer_version(name: str, version: str, request: Request) -> Response:
        """Infer with a loaded version: the champion or the one it replaced."""
        return await infer_route(name, version, request)

    # -- delayed labels --------------------------------------------------------------------

    @app.post(
        "/v2/models/{name}/feedback",
        response_model=FeedbackAccepted,
        status_code=202,
        tags=["feedback"],
        responses=_errors(400, 404, 413, 503),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/FeedbackRequest"}}
                },
            }
        },
    )
    async def feedback(name: str, request: Request) -> dict[str, Any]:
        """The true label of a request this replica answered (its response `id`), published
        to `inference.feedback` once the broker confirms it. 404: an id this replica did not
        answer for this model; 400: a label that is not one of the version's classes."""
        body = await receive_body(request.scope, request.receive, limit)
        checked = parse_feedback(body)
        version, label = check_feedback(server.feedback.answered, name, checked)
        ref = await asyncio.get_running_loop().run_in_executor(
            None, server.feedback.publish, name, version, checked, label
        )
        return {
            "request_id": checked.request_id,
            "model": name,
            "version": version,
            "event_id": ref.id,
        }

    # -- control (OIP model repository extension) ------------------------------------------

    @app.post(
        "/v2/repository/index",
        response_model=list[RepositoryEntry],
        tags=["control"],
        dependencies=[Depends(control)],
    )
    def repository_index() -> list[dict[str, Any]]:
        out = []
        for name in server.registry.names():
            slot = server.registry.slot(name)
            for d in slot.deployments():
                out.append({"name": name, "version": d.version, "state": "READY"})
        return out

    @app.post(
        "/v2/repository/models/{name}/load",
        response_model=ModelMetadata,
        tags=["control"],
        dependencies=[Depends(control)],
        responses=_errors(404, 500, 503),
    )
    def repository_load(name: str) -> dict[str, Any]:
        """Load the model's champion as `model.promoted` has it now (after an unload)."""
        champion = server.deployer.champion(name)
        if champion is None:
            raise UnknownModel(f"model {name!r} was never promoted")
        if server.deployer.handle(champion, again=True) is None:
            reason = server.deployer.failure(champion)
            if reason is None:  # the server is stopping
                raise NotReady(f"model {name!r} was not loaded: the server is stopping")
            raise VerificationFailed(
                f"model {name!r} version {champion.data.version} cannot load: {reason}"
            )
        slot = server.registry.slot(name)
        return model_metadata(name, slot.deployments())

    @app.post(
        "/v2/repository/models/{name}/unload",
        tags=["control"],
        dependencies=[Depends(control)],
        responses=_errors(404),
    )
    def repository_unload(name: str) -> dict[str, Any]:
        """Stop serving the model on this replica (until it is loaded or promoted again)."""
        slot = server.registry.remove(name)
        if slot is None:
            raise UnknownModel(f"model {name!r} is not served here")
        server.deployer.report_unloaded(slot.current)
        return {"name": name, "unloaded": [slot.current.version]}

    @app.get(
        "/metrics",
        tags=["meta"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            extra = InferRequest.model_json_schema(ref_template=REF)
            schemas.update(extra.pop("$defs", {}))
            schemas["InferRequest"] = extra
            schemas["FeedbackRequest"] = FeedbackRequest.model_json_schema(ref_template=REF)
            for item in doc["paths"].values():
                for operation in item.values():
                    # The parameters are path strings and the infer body is parsed by
                    # serving/tensors.py (400): nothing here answers FastAPI's 422.
                    operation.get("responses", {}).pop("422", None)
            guarded = (
                (lambda method, path: path.startswith("/v2/repository/"))
                if server.api_token
                else None
            )
            app.openapi_schema = document_api(
                doc, error_schema=ErrorBody.model_json_schema(ref_template=REF), guarded=guarded
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    return app
