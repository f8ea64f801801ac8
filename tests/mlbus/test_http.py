"""The kernel's HTTP edge (mlbus/http.py): one handler answers each semantic base with its
status and a body naming the problem, and one bearer guard protects what needs a token."""

from __future__ import annotations

import gzip
import zlib
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel

from mlbus.errors import (
    Conflict,
    Invalid,
    MlbusError,
    NotFound,
    PayloadTooLarge,
    TransientError,
    Unauthorized,
    UndecodableBody,
    UnsupportedEncoding,
)
from mlbus.http import (
    bearer_guard,
    content_decoder,
    decode_content,
    document_api,
    install_error_handlers,
)

BASES: dict[type[MlbusError], int] = {
    NotFound: 404, Invalid: 400, Conflict: 409, Unauthorized: 401, TransientError: 503,
    MlbusError: 500,
}  # fmt: skip


class Vanished(NotFound):
    """A component's error: it subclasses a base and inherits its status."""


def raising_app(**handlers: object) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app, **handlers)  # type: ignore[arg-type]
    kinds = {cls.__name__: cls for cls in [*BASES, Vanished]}

    @app.get("/raise/{kind}")
    def raise_(kind: str) -> None:
        raise kinds[kind](f"a {kind} happened")

    @app.get("/count")
    def count(n: Annotated[int, Query()]) -> int:
        return n

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("boom")

    return app


@pytest.mark.parametrize(("kind", "status"), [(k.__name__, s) for k, s in BASES.items()])
def test_each_semantic_base_is_answered_with_its_status(kind, status):
    response = TestClient(raising_app()).get(f"/raise/{kind}")
    assert response.status_code == status
    assert response.json() == {"error": {"type": kind, "message": f"a {kind} happened"}}


def test_a_components_error_inherits_its_bases_status_and_keeps_its_name():
    response = TestClient(raising_app()).get("/raise/Vanished")
    assert response.status_code == 404 and response.json()["error"]["type"] == "Vanished"


def test_unauthorized_names_the_scheme_it_wants():
    response = TestClient(raising_app()).get("/raise/Unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_errors_of_fastapi_and_of_the_code_get_the_same_body():
    client = TestClient(raising_app(), raise_server_exceptions=False)
    invalid = client.get("/count", params={"n": "many"})
    assert invalid.status_code == 422 and invalid.json()["error"]["type"] == "InvalidRequest"
    assert "query.n" in invalid.json()["error"]["message"]
    unknown = client.get("/nowhere")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFound"
    wrong = client.post("/count")
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "MethodNotAllowed"
    crash = client.get("/crash")
    assert crash.status_code == 500
    assert crash.json() == {"error": {"type": "InternalError", "message": "RuntimeError: boom"}}


def test_the_app_chooses_the_shape_of_the_body():
    def flat(kind: str, message: str) -> dict[str, str]:
        return {"error": message, "type": kind}

    response = TestClient(raising_app(body=flat)).get("/raise/Conflict")
    assert response.status_code == 409
    assert response.json() == {"error": "a Conflict happened", "type": "Conflict"}


def guarded_app(token: str | None, **options: object) -> TestClient:
    app = FastAPI(dependencies=[Depends(bearer_guard(token, **options))])  # type: ignore[arg-type]
    install_error_handlers(app)

    @app.get("/thing")
    def read() -> str:
        return "read"

    @app.post("/thing")
    def write() -> str:
        return "written"

    return TestClient(app)


def test_the_guard_refuses_a_missing_or_wrong_token():
    client = guarded_app("s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        response = client.post("/thing", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "Unauthorized"
    assert client.get("/thing").status_code == 401  # no open methods: reading needs it too
    ok = client.post("/thing", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json() == "written"


def test_the_guard_leaves_open_methods_and_an_unset_token_open():
    client = guarded_app("s3cret", open_methods={"GET"}, message="token please")
    assert client.get("/thing").status_code == 200
    refused = client.post("/thing")
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "token please"
    assert guarded_app(None).post("/thing").status_code == 200


# -- compressed bodies ------------------------------------------------------------------


def test_gzip_and_deflate_bodies_are_inflated():
    data = b'{"inputs": []}' * 10
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, body in [
        ("gzip", gzip.compress(data)),
        ("x-gzip", gzip.compress(data)),
        ("deflate", zlib.compress(data)),  # RFC 9110's deflate: the zlib format
        ("deflate", raw.compress(data) + raw.flush()),  # raw deflate, as some clients send
        ("GZIP", gzip.compress(data[:70]) + gzip.compress(data[70:])),  # two gzip members
        ("identity", data),
        ("deflate, gzip", gzip.compress(zlib.compress(data))),  # applied in this order
        (None, data),
    ]:
        assert decode_content(body, encoding, limit=len(data)) == data, encoding


@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_a_body_fed_in_chunks_inflates_as_it_does_whole(size):
    """The streamed decoder (RequestGate's) gives what `decode_content` gives, however the
    body is cut: a zlib header split across chunks, members split across chunks."""
    data = b'{"inputs": []}' * 300
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for encoding, body in [
        ("gzip", gzip.compress(data)),
        ("deflate", zlib.compress(data)),
        ("deflate", raw.compress(data) + raw.flush()),
        ("gzip", gzip.compress(data[:70]) + gzip.compress(data[70:])),
        ("deflate, gzip", gzip.compress(zlib.compress(data))),
    ]:
        decoder = content_decoder(encoding, limit=len(data))
        assert decoder is not None
        out = b"".join(decoder.feed(body[i : i + size]) for i in range(0, len(body), size))
        assert out + decoder.finish() == data, (encoding, size)
    assert content_decoder("identity", 10) is None and content_decoder(None, 10) is None
    bomb = content_decoder("gzip", limit=1000)
    assert bomb is not None
    packed = gzip.compress(b"\0" * 1_000_000)
    with pytest.raises(PayloadTooLarge, match="inflates to more than 1000 bytes"):
        for i in range(0, len(packed), size):
            bomb.feed(packed[i : i + size])
    truncated = content_decoder("gzip", limit=1000)
    assert truncated is not None
    truncated.feed(gzip.compress(b"x" * 100)[:-12])
    with pytest.raises(UndecodableBody, match="truncated"):
        truncated.finish()


def test_a_zip_bomb_is_refused_at_the_limit_without_inflating_it():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 kB -> 64 MB
    with pytest.raises(PayloadTooLarge, match="inflates to more than 1000 bytes"):
        decode_content(bomb, b"gzip", limit=1000)
    # The limit counts every member of a gzip body together.
    members = gzip.compress(b"a" * 600) + gzip.compress(b"b" * 600)
    with pytest.raises(PayloadTooLarge):
        decode_content(members, "gzip", limit=1000)
    assert decode_content(members, "gzip", limit=1200) == b"a" * 600 + b"b" * 600


@pytest.mark.parametrize(
    ("body", "encoding", "error", "fragment"),
    [
        (b"plain", "br", UnsupportedEncoding, "'br' is not supported"),
        (b"plain", "gzip", UndecodableBody, "not valid gzip"),
        (gzip.compress(b"x" * 100)[:-12], "gzip", UndecodableBody, "truncated"),
        (gzip.compress(b"x") + b"junk", "gzip", UndecodableBody, "not valid gzip"),
        (zlib.compress(b"x") + b"junk", "deflate", UndecodableBody, "4 bytes follow"),
    ],
    ids=["br", "not gzip", "truncated", "junk after gzip", "junk after deflate"],
)
def test_bodies_that_do_not_inflate_are_refused(body, encoding, error, fragment):
    with pytest.raises(error, match=fragment):
        decode_content(body, encoding, limit=1000)
    assert UnsupportedEncoding.status == 415 and UndecodableBody.status == 400


# -- what the OpenAPI document says -----------------------------------------------------


def test_405_names_every_method_of_the_path():
    app = raising_app()

    @app.head("/thing")
    @app.get("/thing")
    def thing() -> None:
        return None

    with TestClient(app) as client:
        r = client.post("/thing")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


class Thing(BaseModel):
    name: str


def test_the_document_declares_the_token_and_errors_where_they_are():
    app = FastAPI()

    @app.get("/things/{name}", responses={404: {}})
    def read(name: str, as_of: str | None = None) -> dict[str, str]:
        return {}

    @app.post("/things")
    def write(body: Thing) -> dict[str, str]:
        return {}

    error = {"type": "object", "properties": {"error": {"type": "object"}}}

    def document(guarded):
        doc = document_api(app.openapi(), error_schema=error, guarded=guarded)
        app.openapi_schema = None
        return doc["paths"]["/things/{name}"]["get"], doc["paths"]["/things"]["post"], doc

    read_op, write_op, doc = document(lambda method, path: method == "POST")
    assert "security" not in read_op and write_op["security"] == [{"bearer": []}]
    assert "401" in write_op["responses"] and "401" not in read_op["responses"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for op in (read_op, write_op):  # every error with the app's body, not FastAPI's
        for code in ("404", "422", "401"):
            if code in op["responses"]:
                content = op["responses"][code]["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    read_op, write_op, doc = document(None)  # no token: nothing secured
    assert "securitySchemes" not in doc["components"]
    assert "security" not in write_op and "401" not in write_op["responses"]
