"""The HTTP API: OIP metadata and health, bad input answered with a 4xx and a message (never
a 500), the control endpoints' bearer token, /metrics, and an OpenAPI document that lists
what the server really does."""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import numpy as np

from mlbus.serving.app import Answer, InferFastPath
from mlbus.serving.errors import PayloadTooLarge
from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import body, promote, running, save, wait_version


def test_metadata_health_and_inference(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        # The spec's ready bodies name the model (and the version asked about).
        assert c.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
        r = c.get("/v2/models/digits/versions/1/ready")
        assert r.json() == {"name": "digits", "version": "1", "ready": True}
        # HEAD on health: the status alone, for probes and load balancers.
        for path in ("/v2/health/live", "/v2/health/ready"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b"", (path, r.text)
        meta = c.get("/v2/models/digits").json()
        assert meta["name"] == "digits" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert [o["name"] for o in meta["outputs"]] == ["label", "probabilities"]
        assert meta["parameters"]["classes"] == [str(i) for i in range(10)]
        rows = digits.x[:5]
        r = c.post("/v2/models/digits/infer", json={"id": "req-1", **body(rows)})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["id"] == "req-1" and doc["model_version"] == "1"
        label, probabilities = doc["outputs"]
        assert label["shape"] == [5] and all(
            x in meta["parameters"]["classes"] for x in label["data"]
        )
        p = np.asarray(probabilities["data"]).reshape(probabilities["shape"])
        assert p.shape == (5, 10) and np.allclose(p.sum(axis=1), 1.0, atol=1e-4)
        # Integer pixels (INT64) and FP64 are accepted; only the requested output comes back.
        r = c.post(
            "/v2/models/digits/infer",
            json={**body(rows.astype(np.int64), datatype="INT64"), "outputs": [{"name": "label"}]},
        )
        assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["label"]
        assert r.json()["outputs"][0]["data"] == label["data"]
        # OIP allows the rows nested; a versioned infer answers the same.
        nested = {
            "inputs": [
                {"name": "input", "shape": [5, 64], "datatype": "FP32", "data": rows.tolist()}
            ]
        }
        r = c.post("/v2/models/digits/versions/1/infer", json=nested)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == label["data"]
        assert r.headers["content-type"] == "application/json"
        # Only POST infers: FastAPI answers the rest of the path's methods.
        r = c.get("/v2/models/digits/infer")
        assert r.status_code == 405 and r.json()["type"] == "MethodNotAllowed"
        assert r.headers["allow"] == "POST"
        r = c.post("/v2/health/live")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


def test_bad_input_is_a_4xx_with_a_message(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    row = digits.x[0].tolist()

    def tensor(**changes):
        return {
            "inputs": [
                {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row} | changes
            ]
        }

    cases = {
        "wrong shape": (tensor(shape=[1, 63], data=row[:63]), 400, "64 features"),
        "1-d shape": (tensor(shape=[64]), 400, "shape must be [batch, 64]"),
        "shape vs data": (tensor(shape=[2, 64]), 400, "needs 128"),
        "wrong dtype": (tensor(datatype="BYTES"), 400, "datatype 'BYTES'"),
        "strings in data": (tensor(data=["a"] * 64), 400, "only numbers"),
        "int out of range": (tensor(datatype="UINT8", data=[300] * 64), 400, "UINT8"),
        "beyond fp32": (tensor(data=[1e39] * 64), 400, "FP32 range"),
        "empty batch": (tensor(shape=[0, 64], data=[]), 400, "empty batch"),
        "wrong input name": (tensor(name="pixels"), 400, "'input'"),
        "no inputs": ({"inputs": []}, 400, "non-empty list"),
        "not an object": ([1, 2], 400, "JSON object"),
        "unknown output": ({**tensor(), "outputs": [{"name": "logits"}]}, 400, "logits"),
    }
    with running(kafka, store, max_body_bytes=1024 * 1024) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        for case, (doc, status, fragment) in cases.items():
            r = c.post("/v2/models/digits/infer", json=doc)
            assert r.status_code == status, (case, r.text)
            assert fragment in r.json()["error"], (case, r.json())
        raw = {
            "malformed JSON": (b'{"inputs": [', 400, "not valid JSON"),
            "NaN": (
                b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", '
                b'"data": [' + b", ".join([b"NaN"] * 64) + b"]}]}",
                400,
                "not valid JSON",
            ),
        }
        for case, (data, status, fragment) in raw.items():
            r = c.post(
                "/v2/models/digits/infer",
                content=data,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == status and fragment in r.json()["error"], (case, r.text)
        # An infinity that does get through JSON (1e400 parses to inf, or is refused).
        nan_doc = (
            b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP64", '
            b'"data": [' + b", ".join([b"1e400"] * 64) + b"]}]}"
        )
        r = c.post("/v2/models/digits/infer", content=nan_doc)
        assert r.status_code == 400 and r.json()["error"], r.text
        big = b"x" * (50 * 1024 * 1024)  # 50 MB
        r = c.post("/v2/models/digits/infer", content=big)
        assert r.status_code == 413 and "exceeds" in r.json()["error"]

        def chunks():  # no content-length: the limit applies while reading
            for _ in range(4):
                yield b" " * (512 * 1024)

        r = c.post("/v2/models/digits/infer", content=chunks())
        assert r.status_code == 413, r.text
        r = c.post("/v2/models/nope/infer", json=tensor())
        assert r.status_code == 404 and "nope" in r.json()["error"]
        r = c.post("/v2/models/digits/versions/9/infer", json=tensor())
        assert r.status_code == 404 and "no version '9'" in r.json()["error"]
        assert c.get("/v2/models/nope").status_code == 404
        # The server is still fine.
        assert c.post("/v2/models/digits/infer", json=tensor()).status_code == 200
        metrics = c.get("/metrics").text
        assert (
            'mlbus_serve_errors_total{model="digits",protocol="http",reason="InvalidInput"}'
            in metrics
        )
        assert 'reason="UnknownModel"' in metrics and 'model="_unknown"' in metrics


def test_control_endpoints_need_the_token(kafka, store, digits):
    v1 = save(store, digits.v1, "models/digits/v1")
    promote(kafka, "digits", "1", v1)
    with running(kafka, store, api_token="s3cret") as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        assert c.post("/v2/repository/index").status_code == 401
        # The document declares the token on the control endpoints, and only there.
        doc = c.get("/openapi.json").json()
        secured = {
            path for path, item in doc["paths"].items() for op in item.values() if "security" in op
        }
        assert secured == {p for p in doc["paths"] if p.startswith("/v2/repository/")}
        assert "401" in doc["paths"]["/v2/repository/index"]["post"]["responses"]
        assert "401" not in doc["paths"]["/v2/models/{name}/infer"]["post"]["responses"]
        wrong = {"Authorization": "Bearer nope"}
        assert c.post("/v2/repository/models/digits/unload", headers=wrong).status_code == 401
        assert c.post("/v2/models/digits/infer", json=body(digits.x[:1])).status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        index = c.post("/v2/repository/index", headers=auth).json()
        assert index == [{"name": "digits", "version": "1", "state": "READY", "reason": ""}]
        r = c.post("/v2/repository/models/digits/unload", headers=auth)
        assert r.status_code == 200, r.text
        assert c.post("/v2/models/digits/infer", json=body(digits.x[:1])).status_code == 404
        r = c.post("/v2/repository/models/digits/load", headers=auth)
        assert r.status_code == 200 and r.json()["versions"] == ["1"]
        assert c.post("/v2/models/digits/infer", json=body(digits.x[:1])).status_code == 200
        statuses = wait_until(
            lambda: (
                [e.data.status for e in read_events(kafka, "deployment.updated")]
                if len(read_events(kafka, "deployment.updated")) >= 3
                else None
            ),
            "loaded, unloaded, loaded",
        )
        assert statuses == ["loaded", "unloaded", "loaded"]


def test_openapi_document_describes_the_endpoints(kafka, store):
    with running(kafka, store) as srv, srv.client() as c:
        doc = c.get("/openapi.json").json()
        paths = doc["paths"]
        for path in (
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/{name}",
            "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer",
            "/v2/repository/models/{name}/load",
            "/metrics",
        ):
            assert path in paths, path
        infer = paths["/v2/models/{name}/infer"]["post"]
        ref = infer["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        schemas = doc["components"]["schemas"]
        assert ref == "#/components/schemas/InferRequest"
        tensor_ref = schemas["InferRequest"]["properties"]["inputs"]["items"]["$ref"]
        assert tensor_ref.removeprefix("#/components/schemas/") in schemas
        assert {"200", "400", "404", "413"} <= set(infer["responses"])
        # No token: nothing is secured, and the document says so.
        assert "securitySchemes" not in doc["components"]
        assert not [op for item in paths.values() for op in item.values() if "security" in op]
        # Not ready before anything was read? This server had nothing to load: ready.
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/digits").status_code == 404


def test_the_infer_fast_path_routes_reads_and_answers():
    """The ASGI middleware on its own: which requests it takes, how it reads the body (size
    limit, chunks, a client gone), and what it sends."""
    calls: list[tuple[str, str | None, bytes]] = []
    passed: list[str] = []

    async def infer(name, version, read):
        try:
            payload = await read()
        except PayloadTooLarge as e:
            return Answer(413, str(e).encode())
        calls.append((name, version, payload.content))
        if payload.json_length is not None:  # binary data after the JSON object
            return Answer(200, b'{"ok": true}\x01\x02', 12)
        return Answer(200, b'{"ok": true}')

    async def app(scope, receive, send):
        passed.append(f"{scope['method']} {scope['path']}")

    def call(method, path, chunks=(b"{}",), headers=(), root_path="", limit=10):
        fast = InferFastPath(app, infer=infer, limit=limit)
        sent: list[dict[str, Any]] = []
        messages = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ] or [{"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "root_path": root_path,
            "headers": list(headers),
        }
        asyncio.run(fast(scope, receive, send))
        return sent

    sent = call("POST", "/v2/models/digits/infer")
    assert calls[-1] == ("digits", None, b"{}")
    assert sent[0]["status"] == 200 and (b"content-length", b"12") in sent[0]["headers"]
    assert sent[1] == {"type": "http.response.body", "body": b'{"ok": true}'}
    call("POST", "/v2/models/digits/versions/7/infer", chunks=(b"ab", b"cd", b""))
    assert calls[-1] == ("digits", "7", b"abcd")
    call("POST", "/serve/v2/models/m/infer", root_path="/serve")  # mounted under a prefix
    assert calls[-1][0] == "m"
    sent = call("POST", "/v2/models/m/infer", headers=[(b"content-length", b"11")])
    assert sent[0]["status"] == 413 and len(calls) == 3  # refused before reading
    sent = call("POST", "/v2/models/m/infer", chunks=(b"123456", b"789012"))
    assert sent[0]["status"] == 413
    # A gzip body is inflated before `infer` sees it, within the same limit.
    headers = [(b"content-encoding", b"gzip")]
    call("POST", "/v2/models/m/infer", (gzip.compress(b"abc"),), headers, limit=100)
    assert calls[-1] == ("m", None, b"abc")
    sent = call("POST", "/v2/models/m/infer", (gzip.compress(b" " * 101),), headers, limit=100)
    assert sent[0]["status"] == 413
    # Binary outputs: the JSON object's length in a header, and no JSON content type.
    headers = [(b"inference-header-content-length", b"2")]
    sent = call("POST", "/v2/models/m/infer", headers=headers)
    assert (b"inference-header-content-length", b"12") in sent[0]["headers"]
    assert (b"content-type", b"application/octet-stream") in sent[0]["headers"]
    assert call("POST", "/v2/models/m/infer", chunks=()) == []  # the client went away
    others = [
        "GET /v2/models/m/infer",
        "POST /v2/models/m/infer/",
        "POST /v2/models/m/load",
        "POST /v2/repository/index",
    ]
    for request in others:
        call(*request.split())
    assert passed == others
