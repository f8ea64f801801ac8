"""The HTTP edge every mlbus API shares: one set of exception handlers that answers each
`MlbusError` with the status its class carries (mlbus/errors.py draws the tree), and one
bearer-token guard. Only API apps import this module: it is where the kernel needs FastAPI.

The JSON body names the problem's kind (the error's class name) and its message; its shape
is the app's: the control plane's `{"error": {"type", "message"}}` (the default) or the
model server's Open Inference Protocol `{"error": message, "type": kind}`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlbus.errors import MlbusError, Unauthorized

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
        given = credentials.credentials.encode() if credentials is not None else b""
        # Constant time: how much of a guess matches must not show in the answer's timing.
        if not hmac.compare_digest(given, expected):
            raise Unauthorized(refusal)

    return guard
