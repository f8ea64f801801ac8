"""The Open Inference Protocol as its most used client speaks it: `tritonclient.http` in
its default mode (binary tensors in and out), JSON outputs on request, FP16 and integer
inputs, gzip and deflate bodies; and the refusals a compressed or binary body can earn (a
zip bomb, an unknown encoding, binary data that does not fit)."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.serving.conftest import body, promote, running, save, wait_version


def _input(rows: np.ndarray, datatype: str, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def test_tritonclient_infers_in_its_default_binary_mode(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    rows = digits.x[:7]
    with running(kafka, store) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        # What the same rows give in plain JSON.
        label, probabilities = c.post("/v2/models/digits/infer", json=body(rows)).json()["outputs"]
        expected = np.asarray(probabilities["data"], dtype=np.float32).reshape(7, 10)
        client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
            assert not client.is_model_ready("nope")
            assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
            assert client.get_model_metadata("digits")["inputs"][0]["shape"] == [-1, 64]

            result = client.infer("digits", [_input(rows, "FP32")], request_id="r-1")
            response = result.get_response()
            assert response["id"] == "r-1" and response["model_version"] == "1"
            assert all("binary_data_size" in o["parameters"] for o in response["outputs"])
            assert [x.decode() for x in result.as_numpy("label")] == label["data"]
            np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)

            # JSON outputs when asked for, per output; a JSON input too.
            outputs = [
                triton.InferRequestedOutput("label", binary_data=False),
                triton.InferRequestedOutput("probabilities", binary_data=True),
            ]
            result = client.infer("digits", [_input(rows, "FP32", False)], outputs=outputs)
            assert result.get_output("label")["data"] == label["data"]
            np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)

            # The numeric types as binary data: the same answer for the same pixels.
            for dtype, datatype in [
                (np.float16, "FP16"),
                (np.float64, "FP64"),
                (np.int64, "INT64"),
                (np.uint8, "UINT8"),
            ]:
                result = client.infer("digits", [_input(rows.astype(dtype), datatype)])
                got = [x.decode() for x in result.as_numpy("label")]
                assert got == label["data"], datatype

            # Compressed request bodies, as tritonclient sends them.
            for algorithm in ("gzip", "deflate"):
                result = client.infer(
                    "digits", [_input(rows, "FP32")], request_compression_algorithm=algorithm
                )
                np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)

            # A refusal reaches the client as the server's message.
            with pytest.raises(InferenceServerException, match="64 features") as refused:
                client.infer("digits", [_input(rows[:, :63], "FP32")])
            assert refused.value.status() == "400"
            infinite = np.full((1, 64), np.inf, dtype=np.float16)
            with pytest.raises(InferenceServerException, match="NaN or infinite"):
                client.infer("digits", [_input(infinite, "FP16")])
        finally:
            client.close()
        # FP16 values beyond its largest (65504) are refused, as FP32's are.
        r = c.post("/v2/models/digits/infer", json=body(np.full((1, 64), 7e4), datatype="FP16"))
        assert r.status_code == 400 and "FP16 range" in r.json()["error"], r.text


def test_compressed_and_binary_bodies_are_refused_with_a_reason(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    limit = 1024 * 1024
    url = "/v2/models/digits/infer"
    with running(kafka, store, max_body_bytes=limit) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")

        def post(content: bytes, **headers: str):
            return c.post(url, content=content, headers=headers)

        json_body = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", '
        json_body += b'"data": [' + b", ".join([b"1"] * 64) + b"]}]}"
        assert post(gzip.compress(json_body), **{"content-encoding": "gzip"}).status_code == 200
        raw_deflate = zlib.compressobj(wbits=-15)
        deflated = raw_deflate.compress(json_body) + raw_deflate.flush()
        assert post(deflated, **{"content-encoding": "deflate"}).status_code == 200

        # A zip bomb: 100 kB that inflate to 100 MB, refused at the limit, not inflated.
        bomb = gzip.compress(b" " * (100 * 1024 * 1024), compresslevel=9)
        assert len(bomb) < limit
        r = post(bomb, **{"content-encoding": "gzip"})
        assert r.status_code == 413 and "inflates to more than" in r.json()["error"], r.text

        r = post(json_body, **{"content-encoding": "br"})
        assert r.status_code == 415 and "'br'" in r.json()["error"]
        r = post(b"not gzip at all", **{"content-encoding": "gzip"})
        assert r.status_code == 400 and "not valid gzip" in r.json()["error"]
        r = post(gzip.compress(json_body)[:-10], **{"content-encoding": "gzip"})
        assert r.status_code == 400 and "truncated" in r.json()["error"]

        # Binary data without the header that says where the JSON ends (tritonclient's
        # body sent by hand): the message says what is missing.
        raw = np.ones((1, 64), dtype="<f4").tobytes()
        head = b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", '
        head += b'"parameters": {"binary_data_size": 256}}]}'
        r = post(head + raw)
        assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
        r = post(head + raw, **{"inference-header-content-length": str(len(head))})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        r = post(head + raw[:-4], **{"inference-header-content-length": str(len(head))})
        assert r.status_code == 400 and "binary_data_size is 256, but 252" in r.json()["error"]
        r = post(head + raw, **{"inference-header-content-length": "x"})
        assert r.status_code == 400 and "not a length" in r.json()["error"]
        metrics = c.get("/metrics").text
        assert 'reason="UnsupportedEncoding"' in metrics and 'reason="UndecodableBody"' in metrics
