"""The HTTP edge every mlbus API shares: one set of exception handlers that answers each
`MlbusError` with the status its class carries (mlbus/errors.py draws the tree), one
bearer-token guard, and the body limit: a declared length checked before anything is read
(`check_length`) and the bytes counted as they arrive (`counted`), which the model server's
infer path and the control plane's `RequestGate` both use. A compressed body
(`Content-Encoding: gzip` or `deflate`) is inflated under the same limit, counted on the
inflated bytes: whole by `decode_content` (the model server's infer path), as it arrives by
`RequestGate` (the control plane, whose uploads are streamed), both with `Inflater`.
`document_api` makes an app's OpenAPI document say what these answer: the app's error
body on every error status, bearer security only where the token is enforced. Only API
apps import this module: it is where the kernel needs FastAPI.

The JSON body names the problem's kind (the error's class name) and its message; its shape
is the app's: the control plane's `{"error": {"type", "message"}}` (the default) or the
model server's Open Inference Protocol `{"error": message, "type": kind}`.
"""

from __future__ import annotations

import hmac
import logging
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlbus.errors import (
    InvalidPath,
    MlbusError,
    PayloadTooLarge,
    Unauthorized,
    UndecodableBody,
    UnsupportedEncoding,
)

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
        headers = error.headers
        if error.status_code == 405:  # every route of the path, not only the first matched
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request))}
        return respond(kind, str(error.detail), error.status_code, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return respond("InternalError", f"{type(error).__name__}: {error}", 500)


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
    with no token, everything is open. It declares nothing in OpenAPI: `document_api` does,
    on the operations that really need the token."""
    expected = token.encode() if token else None
    refusal = message or "this endpoint needs 'Authorization: Bearer <MLBUS_API_TOKEN>'"
    methods = frozenset(open_methods)

    def guard(request: Request) -> None:
        if expected is None or request.method in methods:
            return
        if not _authorized(request.headers.get("authorization"), expected):
            raise Unauthorized(refusal)

    return guard


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods some route of `app` answers on the request's path (RFC 9110's `Allow`)."""
    path = request.scope.get("path", "")
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.fullmatch(path):
            methods |= route.methods
    return sorted(methods)


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


def decoded(receive: Receive, decoder: ContentDecoder) -> Receive:
    """`receive` whose body chunks are `decoder`'s output: a body sent compressed reaches
    the app inflated, as it arrives."""

    async def receive_decoded() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            body = decoder.feed(message.get("body", b""))
            if not message.get("more_body", False):
                body += decoder.finish()
            message = {**message, "body": body}
        return message

    return receive_decoded


#: zlib's window bits for each content coding (RFC 9110): gzip, and "deflate", which is the
#: zlib format (some clients send raw deflate: tried when the zlib header is missing).
_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Inflater:
    """One content coding undone as the body arrives (`feed` each chunk, then `finish`),
    never holding more than `limit` inflated bytes: `PayloadTooLarge` as soon as they exceed
    it (a few kilobytes of gzip can inflate to gigabytes: zlib is never asked for more than
    the limit), `UndecodableBody` for data that does not inflate or stops short."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding, self.limit = coding, limit
        self.size = 0  # inflated bytes so far
        self._wbits = _CODINGS[coding]
        self._zlib = zlib.decompressobj(self._wbits)
        self._head = b""  # what was fed before any output: retried as raw deflate

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        while data:
            if self._zlib.eof:  # a gzip body may hold several members, one after the other
                if self.coding == "deflate":
                    raise UndecodableBody(f"{len(data)} bytes follow the end of the deflate data")
                self._zlib = zlib.decompressobj(self._wbits)
            try:
                chunk = self._zlib.decompress(data, self.limit + 1 - self.size)
            except zlib.error as e:
                if self.coding == "deflate" and self._wbits > 0 and not self.size:
                    self._wbits = -zlib.MAX_WBITS  # raw deflate, without the zlib header
                    self._zlib = zlib.decompressobj(self._wbits)
                    data, self._head = self._head + data, b""
                    continue
                raise UndecodableBody(f"the body is not valid {self.coding} data: {e}") from None
            if not self.size and self._wbits > 0 and self.coding == "deflate":
                self._head += data[: len(data) - len(self._zlib.unconsumed_tail)]
            self.size += len(chunk)
            if self.size > self.limit:
                raise PayloadTooLarge(f"request body inflates to more than {self.limit} bytes")
            out += chunk
            # Output under the limit means every byte was taken: what is left, if anything,
            # follows the end of a member.
            data = self._zlib.unused_data if self._zlib.eof else b""
        return bytes(out)

    def finish(self) -> bytes:
        if not self._zlib.eof:
            raise UndecodableBody(f"the {self.coding} body is truncated")
        return b""


class ContentDecoder:
    """A body's `Content-Encoding` undone chunk by chunk: its codings' inflaters, last
    applied first, each bounded by `limit`."""

    def __init__(self, codings: list[str], limit: int) -> None:
        self._inflaters = [Inflater(coding, limit) for coding in reversed(codings)]

    def feed(self, data: bytes) -> bytes:
        for inflater in self._inflaters:
            data = inflater.feed(data)
        return data

    def finish(self) -> bytes:
        data = b""
        for inflater in self._inflaters:
            data = inflater.feed(data) + inflater.finish()
        return data


def content_decoder(encoding: bytes | str | None, limit: int) -> ContentDecoder | None:
    """The decoder of a body sent with this `Content-Encoding` header, None when there is
    nothing to undo (no header, identity); `UnsupportedEncoding` for a coding other than
    gzip, deflate or identity, before any of the body is read."""
    if not encoding:
        return None
    text = encoding.decode("latin-1") if isinstance(encoding, bytes) else encoding
    codings = [c.strip().lower() for c in text.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    for coding in codings:
        if coding not in _CODINGS:
            raise UnsupportedEncoding(
                f"Content-Encoding {coding!r} is not supported: send gzip, deflate or identity"
            )
    return ContentDecoder(codings, limit) if codings else None


def decode_content(body: bytes, encoding: bytes | str | None, limit: int) -> bytes:
    """`body` with its `Content-Encoding` undone, whole (`content_decoder`'s errors)."""
    decoder = content_decoder(encoding, limit)
    if decoder is None:
        return body
    return decoder.feed(body) + decoder.finish()


# -- what an app's OpenAPI document says ----------------------------------------------------

#: The name of the bearer scheme in the documents' `securitySchemes`.
BEARER = "bearer"
#: pydantic's `ref_template` for a schema placed under the document's components.
REF = "#/components/schemas/{model}"


def document_api(
    doc: dict[str, Any],
    *,
    error_schema: dict[str, Any],
    guarded: Callable[[str, str], bool] | None = None,
    errors: Callable[[str, str, dict[str, Any]], Iterable[int]] = lambda m, p, op: (),
) -> dict[str, Any]:
    """Make a FastAPI OpenAPI document say what the app answers. Every error status an
    operation declares (and those `errors(method, path, operation)` adds) has the app's
    `error_schema` (its `$defs` under components, so `ref_template` must point there), not
    FastAPI's validation body, which no handler answers. Bearer
    security and a 401 are declared on exactly the operations `guarded(method, path)`
    (methods in upper case) says need the token; none when it is None (no token set)."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    error_schema = dict(error_schema)
    schemas.update(error_schema.pop("$defs", {}))
    schemas["Error"] = error_schema
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    secured = False
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                _not_null(parameter.get("schema", {}))
            operation.pop("security", None)
            responses = operation.setdefault("responses", {})
            statuses = set(errors(method.upper(), path, operation))
            if guarded is not None and guarded(method.upper(), path):
                operation["security"] = [{BEARER: []}]
                statuses.add(401)
                secured = True
            for status in statuses:
                responses.setdefault(str(status), {})
            for code, response in responses.items():
                if code[0] in "45":
                    response["content"] = error
                    response["description"] = _REASONS.get(code, response.get("description", ""))
    schemes = doc["components"].setdefault("securitySchemes", {})
    schemes.clear()
    if secured:
        schemes[BEARER] = {
            "type": "http",
            "scheme": "bearer",
            "description": "the API token (MLBUS_API_TOKEN)",
        }
    else:
        doc["components"].pop("securitySchemes")
    return doc


def _not_null(schema: dict[str, Any]) -> None:
    """A parameter's `anyOf: [X, null]` (FastAPI's optional parameter) as X: a path,
    query or header value is absent or a string, never null."""
    options = schema.get("anyOf")
    if options and len(options) == 2 and {"type": "null"} in options:
        [kept] = [o for o in options if o != {"type": "null"}]
        del schema["anyOf"]
        for key, value in kept.items():
            schema.setdefault(key, value)


_REASONS = {
    "400": "Bad request: the error names the problem",
    "401": "Without 'Authorization: Bearer <token>'",
    "404": "Not found",
    "409": "Conflicts with the current state",
    "413": "The request body exceeds its limit",
    "415": "A Content-Encoding other than gzip, deflate or identity",
    "422": "A parameter or body that does not validate",
    "500": "A version that cannot be served",
    "503": "Not ready, or the broker or store is out of reach: try again (Retry-After)",
}


class RequestGate:
    """ASGI middleware, ahead of the app: what every request must pass before any of its
    body is read. With `token` set, a request whose method is not in `open_methods` needs
    the bearer token (401), so that an unauthenticated body is never parsed nor buffered
    (FastAPI reads and validates a body before it runs any dependency). A NUL byte in the
    path or query is a 400. A body is refused with 413 when its declared length exceeds
    its limit, and otherwise as soon as the bytes received do; a `multipart/form-data`
    body (an upload, which the app streams to disk) has `max_upload_bytes`, any other
    `max_body_bytes`. A body sent with `Content-Encoding: gzip` or `deflate` reaches the app
    inflated, as it arrives (an upload stays streamed), its inflated size under the same
    limit (413), data that does not inflate a 400 and another coding a 415, refused before
    the body is read; the app sees neither the coding nor the compressed length. The
    refusal is `body(kind, message)`, as `install_error_handlers`."""

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

    def decoder(self, scope: Scope) -> ContentDecoder | None:
        """The body's decoder (`content_decoder`), and the scope's headers without what
        describes the encoded body: the app reads the inflated one."""
        decoder = content_decoder(header(scope, b"content-encoding"), self.limit(scope))
        if decoder is not None:
            encoded = (b"content-encoding", b"content-length")
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in encoded]
        return decoder

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
            decoder = self.decoder(scope)
        except MlbusError as e:
            return await self.refuse(send, e)
        exceeded: list[PayloadTooLarge | UndecodableBody] = []
        started = False
        limited = counted(receive, self.limit(scope))
        if decoder is not None:
            limited = decoded(limited, decoder)

        async def receive_limited() -> Message:
            try:
                return await limited()
            except (PayloadTooLarge, UndecodableBody) as e:
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
