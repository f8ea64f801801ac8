"""The kernel's request gate (mlbus/http.py `RequestGate`), driven with raw ASGI messages so
that the test sees how much of a body the app asked for: the token, a NUL byte and a
declared length are refused before any of the body is read; a chunked body is counted and
refused as soon as it passes its limit, with 413 rather than the app's answer to a body cut
short."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel

from mlbus.http import RequestGate, install_error_handlers


class Note(BaseModel):
    text: str


def gated(**options: Any) -> tuple[FastAPI, list[str]]:
    """An app with a JSON body route behind the gate, and the notes that reached it."""
    app = FastAPI()
    install_error_handlers(app)
    reached: list[str] = []

    @app.post("/notes")
    def post(note: Note) -> int:
        reached.append(note.text)
        return len(note.text)

    @app.get("/notes/{name}")
    def get(name: str) -> str:
        return name

    app.add_middleware(RequestGate, **{"max_body_bytes": 1024, **options})
    return app, reached


class Answer:
    def __init__(self, sent: list[dict[str, Any]], asked: int) -> None:
        start = next(m for m in sent if m["type"] == "http.response.start")
        self.status: int = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start["headers"]}
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        self.json = orjson.loads(body)
        self.asked = asked  # body messages the app (or the gate) asked for


def call(
    app: FastAPI,
    method: str,
    path: str,
    chunks: tuple[bytes, ...] = (),
    headers: dict[str, str] | None = None,
    query: bytes = b"",
) -> Answer:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]
    asked = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal asked
        asked += 1
        return messages[asked - 1] if asked <= len(messages) else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    return Answer(sent, asked)


JSON = {"content-type": "application/json"}


def note(size: int) -> bytes:
    return orjson.dumps({"text": "x" * size})


def test_a_body_within_the_limit_reaches_the_app_whole():
    app, reached = gated()
    body = note(900)
    answer = call(app, "POST", "/notes", (body[:300], body[300:]), JSON)
    assert answer.status == 200 and answer.json == 900 and reached == ["x" * 900]


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read():
    app, reached = gated()
    headers = JSON | {"content-length": "2000"}
    answer = call(app, "POST", "/notes", (note(1985),), headers)
    assert answer.status == 413 and answer.asked == 0 and reached == []
    assert answer.json == {
        "error": {
            "type": "PayloadTooLarge",
            "message": "request body of 2000 bytes exceeds 1024 bytes",
        }
    }


def test_a_chunked_body_is_counted_and_refused_once_over_the_limit():
    """FastAPI answers a body it could not read with its own 400: the gate's 413 wins."""
    app, reached = gated()
    body = note(5000)
    chunks = tuple(body[i : i + 500] for i in range(0, len(body), 500))
    answer = call(app, "POST", "/notes", chunks, JSON)
    assert answer.status == 413, answer.json
    assert answer.json["error"] == {
        "type": "PayloadTooLarge",
        "message": "request body exceeds 1024 bytes",
    }
    assert answer.asked == 3 and reached == []  # 1500 bytes read of 5012, then refused


def test_without_the_token_a_mutating_request_is_refused_before_its_body_is_read():
    app, reached = gated(token="s3cret", open_methods={"GET"}, message="token please")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"}):
        answer = call(app, "POST", "/notes", (note(10),), JSON | headers)
        assert answer.status == 401 and answer.asked == 0, headers
        assert answer.json == {"error": {"type": "Unauthorized", "message": "token please"}}
        assert answer.headers["www-authenticate"] == "Bearer"
    assert call(app, "GET", "/notes/a").status == 200  # reading stays open
    allowed = call(app, "POST", "/notes", (note(10),), JSON | {"authorization": "bearer s3cret"})
    assert allowed.status == 200 and reached == ["x" * 10]


def test_a_multipart_upload_has_its_own_limit():
    app, _ = gated(max_upload_bytes=8192)
    form = {"content-type": "multipart/form-data; boundary=b"}
    over = call(app, "POST", "/notes", (b"-" * 9000,), form | {"content-length": "9000"})
    assert over.status == 413 and "exceeds 8192 bytes" in over.json["error"]["message"]
    # Within the upload limit (and over the body limit): the app gets it (and refuses the form).
    within = call(app, "POST", "/notes", (b"-" * 2000,), form | {"content-length": "2000"})
    assert within.status not in (413, 500) and within.asked >= 1


def test_a_nul_byte_in_the_path_or_query_is_a_400():
    app, _ = gated()
    for path, query in (("/notes/a\x00b", b""), ("/notes/a", b"q=%00"), ("/notes/a", b"q=\x00")):
        answer = call(app, "GET", path, query=query)
        assert answer.status == 400, (path, query)
        assert answer.json["error"]["type"] == "InvalidPath"
        assert "NUL byte" in answer.json["error"]["message"]
    assert call(app, "GET", "/notes/a", query=b"q=%2500").status == 200  # an escaped '%'
