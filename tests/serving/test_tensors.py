"""Input tensors: the flat `data` list (or nested rows), or binary data after the JSON
object (the binary tensor extension), becomes float32 [rows, features], and every refusal
names why, in the same order of checks whatever the fast path skips; outputs go back as
JSON or as binary data."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest
from torch import nn

from mlbus.ml.card import ModelCard
from mlbus.serving.errors import InvalidInput, MalformedRequest
from mlbus.serving.registry import Deployment
from mlbus.serving.tensors import (
    decode_request,
    encode_response,
    float64,
    parse_body,
    to_array,
)


def _deployment(features: int = 3) -> Deployment:
    card = ModelCard(
        family="mlp",
        hyperparameters={},
        label="c",
        features=[f"f{i}" for i in range(features)],
        classes=["a", "b"],
        mean=[0.0] * features,
        std=[1.0] * features,
    )
    return Deployment("m", "1", "sha256:" + "0" * 64, nn.Linear(features, 2).eval(), card)


def test_flat_and_nested_data_give_the_same_rows():
    d = _deployment()
    flat = to_array(d, "input", [2, 3], "FP32", [0.5, 1, 2.25, -3, 4, True])
    nested = to_array(d, "input", [2, 3], "FP64", [[0.5, 1, 2.25], [-3, 4, True]])
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    assert np.array_equal(flat, [[0.5, 1, 2.25], [-3, 4, 1]])
    assert np.array_equal(nested, flat)
    assert np.array_equal(to_array(d, "input", [1, 3], "INT64", [1, 2, 3]), [[1, 2, 3]])


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("FP32", ["a", 1, 2], "only numbers"),
        ("FP32", [10**400, 1, 2], "only numbers"),  # no float holds it (was a 500)
        ("FP32", [[1, 2], [3]], "only numbers"),  # ragged rows
        ("FP32", [1, 2], "needs 3"),
        ("FP32", [float("nan"), 1, 2], "NaN or infinite"),
        ("FP64", [float("inf"), 1, 2], "NaN or infinite"),
        ("FP64", [1e39, 1, 2], "FP32 range"),
        ("INT8", [300, 1, 2], "INT8"),
        ("INT8", [1.5, 1, 2], "INT8"),
        ("INT8", [float("nan"), 1, 2], "NaN or infinite"),  # before the datatype's range
        ("UINT64", [1e39, 1, 2], "UINT64"),  # the datatype's range before FP32's
        ("FP16", [70000, 1, 2], "FP16 range"),  # refused like FP32's overflow
        ("FP16", [1e39, 1, 2], "FP16 range"),
    ],
)
def test_refusals_say_why(datatype, data, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        to_array(_deployment(), "input", [1, 3], datatype, data)


def test_float64_packs_numbers_and_refuses_the_rest():
    assert np.array_equal(float64([1, 2.5, False], "no"), [1.0, 2.5, 0.0])
    assert np.array_equal(float64([[1, 2], [3, 4]], "no"), [1, 2, 3, 4])
    assert float64([], "no").size == 0
    for bad in (["x"], [{"a": 1}], [[1], [2, 3]]):
        with pytest.raises(InvalidInput, match=r"^no$"):
            float64(bad, "no")


def test_fp16_values_are_those_fp16_holds():
    x = to_array(_deployment(), "input", [1, 3], "FP16", [65504, 0.1, -2])
    assert np.array_equal(x, np.array([[65504, 0.1, -2]], dtype=np.float16).astype(np.float32))


def _binary_request(array: np.ndarray, datatype: str, **outputs) -> bytes:
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    tensor = {"name": "input", "shape": list(array.shape), "datatype": datatype}
    doc = {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}], **outputs}
    return orjson.dumps(doc) + raw


@pytest.mark.parametrize(
    ("dtype", "datatype"),
    [
        (np.float16, "FP16"),
        (np.float32, "FP32"),
        (np.float64, "FP64"),
        (np.int8, "INT8"),
        (np.int64, "INT64"),
        (np.uint8, "UINT8"),
        (np.uint32, "UINT32"),
    ],
)
def test_binary_inputs_of_every_numeric_type(dtype, datatype):
    rows = np.array([[1, 2, 3], [4, 5, 126]], dtype=dtype)
    body = _binary_request(rows, datatype)
    json_length = len(body) - rows.nbytes
    doc, binary = parse_body(body, str(json_length).encode())
    request = decode_request(doc, _deployment(), binary)
    assert request.x.dtype == np.float32 and np.array_equal(request.x, rows.astype(np.float32))
    assert request.binary == frozenset()  # outputs in JSON unless asked for


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        (lambda b, n: (b + b"\0", n), MalformedRequest, "binary_data_size is 24, but 25"),
        (lambda b, n: (b, n + 10_000), MalformedRequest, "not a length within"),
        (lambda b, n: (b, None), MalformedRequest, "Inference-Header-Content-Length header"),
        (lambda b, n: (b[:n], n), MalformedRequest, "but 0 bytes"),
    ],
)
def test_binary_data_that_does_not_fit_is_refused(change, error, fragment):
    rows = np.ones((2, 3), dtype=np.float32)
    body = _binary_request(rows, "FP32")
    body, json_length = change(body, len(body) - rows.nbytes)
    with pytest.raises(error, match=fragment):
        doc, binary = parse_body(body, None if json_length is None else str(json_length))
        decode_request(doc, _deployment(), binary)


def test_binary_inputs_are_checked_like_json_ones():
    d = _deployment()
    for array, datatype, fragment in [
        (np.array([[np.nan, 1, 2]], dtype=np.float32), "FP32", "NaN or infinite"),
        (np.array([[1e39, 1, 2]], dtype=np.float64), "FP64", "FP32 range"),
        (np.array([[1, 2, 3]], dtype=np.float32), "FP64", "needs 24"),
        (np.array([[1, 2]], dtype=np.float32), "FP32", "3 features"),
    ]:
        body = _binary_request(array, datatype)
        doc, binary = parse_body(body, str(len(body) - array.nbytes))
        with pytest.raises(InvalidInput, match=fragment):
            decode_request(doc, d, binary)


def test_outputs_as_binary_data_when_asked():
    d = _deployment()
    rows = np.ones((1, 3), dtype=np.float32)

    every = {"parameters": {"binary_data_output": True}}
    body = _binary_request(rows, "FP32", **every)
    doc, binary = parse_body(body, str(len(body) - rows.nbytes))
    assert decode_request(doc, d, binary).binary == {"label", "probabilities"}
    # An output's own parameter wins over the request's.
    outputs = [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}]
    body = _binary_request(rows, "FP32", **every, outputs=outputs)
    doc, binary = parse_body(body, str(len(body) - rows.nbytes))
    request = decode_request(doc, d, binary)
    assert request.outputs == ("label", "probabilities") and request.binary == {"probabilities"}
    with pytest.raises(MalformedRequest, match="'binary_data' must be a boolean"):
        bad = [{"name": "label", "parameters": {"binary_data": "yes"}}]
        body = _binary_request(rows, "FP32", outputs=bad)
        doc, binary = parse_body(body, str(len(body) - rows.nbytes))
        decode_request(doc, d, binary)


def test_binary_outputs_follow_the_json_object():
    probabilities = np.array([[0.25, 0.75], [1.0, 0.0]], dtype=np.float32)
    labels = ["b", "été"]

    def doc():
        return {
            "model_name": "m",
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [2], "data": labels},
                {"name": "probabilities", "datatype": "FP32", "shape": [2, 2],
                 "data": probabilities.reshape(-1)},
            ],
        }  # fmt: skip

    body, json_length = encode_response(doc())
    assert json_length is None and orjson.loads(body)["outputs"][0]["data"] == labels
    body, json_length = encode_response(doc(), frozenset({"label", "probabilities"}))
    head, tail = orjson.loads(body[:json_length]), body[json_length:]
    label, probs = head["outputs"]
    assert "data" not in label and "data" not in probs
    encoded = [s.encode() for s in labels]
    expected_labels = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    assert label["parameters"] == {"binary_data_size": len(expected_labels)}
    assert probs["parameters"] == {"binary_data_size": 16}
    assert tail == expected_labels + probabilities.astype("<f4").tobytes()
