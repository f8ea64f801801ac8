"""The HTTP edge every mlbus API shares: one set of exception handlers that answers each
`MlbusError` with the status its class carries (mlbus/errors.py draws the tree), one
bearer-token guard, and the body limit: a declared length checked before anything is read
(`check_length`) and the bytes counted as they arrive (`counted`), which the model server's
infer path and the control plane's `RequestGate` both use. Only API apps import this module:
it is where the kernel needs FastAPI.

The JSON body names the problem's kind (the error's class name) and its message; its shape
is the app's: the control plane's `{"error": {"type", "message"}}` (the default) or the
model server's Open Inference Protocol `{"error": message, "type": kind}`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlbus.errors import InvalidPath, MlbusError, PayloadTooLarge, Unauthorized

log = logging.getLogger(__name__)

#: (kind, message) -> the JSON body of an error response.
ErrorBody = Callable[[str, str], dict[str, Any]]


def nested_body(kind: str, message: str) -> dict[str, Any]:
    """The control plane's error body: `{"error": {"type": kind, "message": message}}`."""
    return {"error": {"type": kind, "message": message}}


# Kinds for the errors FastAPI and Starlette raise themselves (unknown route, wrong method).
_HTTP_KINDS = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}

# A 401 says which scheme would be accepted (RFC 9110, section 11.6.1).
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _headers(error: MlbusError) -> Mapping[str, str] | None:
    return _CHALLENGE if isinstance(error, Unauthorized) else None


def install_error_handlers(app: FastAPI, body: ErrorBody = nested_body) -> None:
    """Answer every error raised while serving a request with `body(kind, message)`:
    an `MlbusError` with its class's `status`, FastAPI's request validation with 422,
    Starlette's HTTP errors with their own status, anything else with 500 (and a log line)."""

    def respond(
        kind: str, message: str, status: int, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        return JSONResponse(body(kind, message), status_code=status, headers=headers)

    @app.exception_handler(MlbusError)
    async def _mlbus_error(request: Request, error: MlbusError) -> JSONResponse:
        return respond(type(error).__name__, str(error), error.status, _headers(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return respond("InvalidRequest", f"{where}: {first['msg']}", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(error.status_code, "HTTPError")
        return respond(kind, str(error.detail), error.status_code, error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return respond("InternalError", f"{type(error).__name__}: {error}", 500)


# Module level: FastAPI resolves a dependency's (string) annotations in its module's scope.
_bearer = HTTPBearer(auto_error=False, description="the API token (MLBUS_API_TOKEN)")


def _authorized(header: str | None, expected: bytes) -> bool:
    """Whether an `Authorization` header carries `Bearer <expected>` (the scheme is case
    insensitive, as HTTPBearer reads it)."""
    scheme, _, credentials = (header or "").partition(" ")
    given = credentials.strip().encode() if scheme.lower() == "bearer" else b""
    # Constant time: how much of a guess matches must not show in the answer's timing.
    return hmac.compare_digest(given, expected)


def bearer_guard(
    token: str | None, *, open_methods: Collection[str] = (), message: str | None = None
) -> Callable[..., None]:
    """A FastAPI dependency: with `token` set, a request whose method is not in
    `open_methods` needs `Authorization: Bearer <token>` or is refused with `Unauthorized`;
    with no token, everything is open."""
    expected = token.encode() if token else None
    refusal = message or "this endpoint needs 'Authorization: Bearer <MLBUS_API_TOKEN>'"
    methods = frozenset(open_methods)

    def guard(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if expected is None or request.method in methods:
            return
        given = credentials.credentials if credentials is not None else ""
        if not _authorized(f"Bearer {given}", expected):
            raise Unauthorized(refusal)

    return guard


# -- limits on what a request may send ------------------------------------------------------


def check_length(length: bytes | str | None, limit: int) -> None:
    """`PayloadTooLarge` before reading a body whose declared length exceeds `limit` bytes."""
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {int(length)} bytes exceeds {limit} bytes")


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (`name` in lower case) of an ASGI scope."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def counted(receive: Receive, limit: int) -> Receive:
    """`receive` that raises `PayloadTooLarge` as soon as the body it has passed on exceeds
    `limit` bytes: a chunked body has no length to check first, so its bytes are counted."""
    size = 0

    async def receive_counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return message

    return receive_counted


class RequestGate:
    """ASGI middleware, ahead of the app: what every request must pass before any of its
    body is read. With `token` set, a request whose method is not in `open_methods` needs
    the bearer token (401), so that an unauthenticated body is never parsed nor buffered
    (FastAPI reads and validates a body before it runs any dependency). A NUL byte in the
    path or query is a 400. A body is refused with 413 when its declared length exceeds
    its limit, and otherwise as soon as the bytes received do; a `multipart/form-data`
    body (an upload, which the app streams to disk) has `max_upload_bytes`, any other
    `max_body_bytes`. The refusal is `body(kind, message)`, as `install_error_handlers`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int | None = None,
        token: str | None = None,
        open_methods: Collection[str] = (),
        message: str | None = None,
        body: ErrorBody = nested_body,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes or max_body_bytes
        self.expected = token.encode() if token else None
        self.open_methods = frozenset(open_methods)
        self.refusal = message or "this endpoint needs 'Authorization: Bearer <MLBUS_API_TOKEN>'"
        self.body = body

    def limit(self, scope: Scope) -> int:
        content_type = (header(scope, b"content-type") or b"").lower()
        if content_type.startswith(b"multipart/form-data"):
            return self.max_upload_bytes
        return self.max_body_bytes

    def check(self, scope: Scope) -> None:
        """Raise the refusal of a request from its method, path and headers alone."""
        if self.expected is not None and scope["method"] not in self.open_methods:
            given = header(scope, b"authorization")
            if not _authorized(given.decode("latin-1") if given else None, self.expected):
                raise Unauthorized(self.refusal)
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"\x00" in query or b"%00" in query:
            raise InvalidPath("the request's path or query contains a NUL byte (%00)")
        check_length(header(scope, b"content-length"), self.limit(scope))

    async def refuse(self, send: Send, error: MlbusError) -> None:
        content = orjson.dumps(self.body(type(error).__name__, str(error)))
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(content)),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in (_headers(error) or {}).items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self.check(scope)
        except MlbusError as e:
            return await self.refuse(send, e)
        exceeded: list[PayloadTooLarge] = []
        started = False
        limited = counted(receive, self.limit(scope))

        async def receive_limited() -> Message:
            try:
                return await limited()
            except PayloadTooLarge as e:
                exceeded.append(e)
                raise

        async def send_unless_exceeded(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a body cut short: replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_limited, send_unless_exceeded)
        except Exception:
            if not exceeded or started:
                raise
        if exceeded and not started:
            await self.refuse(send, exceeded[0])
