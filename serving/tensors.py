"""Open Inference Protocol v2 tensors in and out: the request body (orjson) or a stream
request's `Tensor`s become one float32 array checked against the model card, and the
forward pass's probabilities become the `label` and `probabilities` outputs.

The flat `data` list becomes an array in C, with no Python loop over its elements (packed as
doubles by `struct`: three times faster than `np.array(list)`, which first walks the list to
discover its shape); orjson writes the probabilities straight from the numpy array.

The binary tensor extension (what tritonclient sends by default): the JSON object is the
first `Inference-Header-Content-Length` bytes of the body, an input with the parameter
`binary_data_size` has its values after it, little-endian and row-major; an output is
answered the same way when its `binary_data` parameter (or the request's
`binary_data_output`) says so, a BYTES element as a 4-byte length and its UTF-8 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from mlbus.serving.errors import InvalidInput, MalformedRequest, TooManyRows
from mlbus.serving.registry import INPUT, LABEL, PREDICTION, PROBABILITIES, Deployment

#: Datatypes accepted for the input (all become float32 for the model).
NUMERIC = frozenset(
    {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
     "UINT64"}
)  # fmt: skip
_INT_RANGE = {
    "INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}  # fmt: skip
OUTPUTS = (LABEL, PROBABILITIES)
#: The most characters of a client's value quoted in an error (a shape or name can be huge).
SHOWN = 80


def show(value: Any) -> str:
    """`repr(value)`, cut to SHOWN characters: what an error message quotes of a request."""
    text = (
        repr(value) if not isinstance(value, list) or len(value) <= SHOWN else repr(value[:SHOWN])
    )
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


#: The numpy type of each datatype's binary data: little-endian, its native size.
BINARY_DTYPES: dict[str, np.dtype[Any]] = {
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
}  # fmt: skip
#: The binary tensor extension's parameters: the size of a tensor's binary data (input and
#: response output), an output's choice, and the request's default for every output.
BINARY_DATA_SIZE, BINARY_DATA, BINARY_DATA_OUTPUT = (
    "binary_data_size",
    "binary_data",
    "binary_data_output",
)


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded inference request: the input rows and what to answer."""

    id: str | None
    x: np.ndarray  # float32 [rows, features], finite
    outputs: tuple[str, ...]
    #: The outputs to answer as binary data (binary tensor extension).
    binary: frozenset[str] = frozenset()


def parse_body(
    body: bytes, header_length: bytes | str | None = None
) -> tuple[dict[str, Any], bytes]:
    """The request's JSON object and the binary data after it: with `header_length` (the
    `Inference-Header-Content-Length` header), the JSON is that many first bytes."""
    binary = b""
    if header_length is not None:
        text = (
            header_length.decode("latin-1") if isinstance(header_length, bytes) else header_length
        )
        if not text.strip().isdigit() or int(text) > len(body):
            raise MalformedRequest(
                f"Inference-Header-Content-Length {text!r} is not a length within the body's "
                f"{len(body)} bytes"
            )
        body, binary = body[: int(text)], body[int(text) :]
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        hint = (
            ""
            if header_length is not None
            else (" (binary tensor data needs the Inference-Header-Content-Length header)")
        )
        raise MalformedRequest(f"the body is not valid JSON: {e}{hint}") from None
    if not isinstance(doc, dict):
        raise MalformedRequest("the body must be a JSON object with an 'inputs' list")
    return doc, binary


def decode_request(
    doc: Mapping[str, Any],
    deployment: Deployment,
    binary: bytes = b"",
    *,
    max_rows: int | None = None,
    max_id_bytes: int | None = None,
) -> Request:
    """Check an OIP request object (and the binary data after it) against the deployment's
    card; `InvalidInput`, `MalformedRequest` or `TooManyRows` (each naming the input, field
    or limit) if it does not fit."""
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise MalformedRequest("'id' must be a string")
        check_request_id(request_id, max_id_bytes)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MalformedRequest("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        names = [i.get("name") if isinstance(i, dict) else None for i in inputs]
        raise InvalidInput(f"model {deployment.name} takes one input {INPUT!r}, got {names}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise MalformedRequest("each input must be an object with name, shape, datatype, data")
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    size = _parameter(tensor, BINARY_DATA_SIZE, int, f"input {show(name)}")
    if size is None:
        if binary:
            raise MalformedRequest(
                f"{len(binary)} bytes follow the JSON object, but no input has the parameter "
                f"{BINARY_DATA_SIZE!r}"
            )
        x = to_array(deployment, name, shape, datatype, tensor.get("data"), max_rows=max_rows)
    else:
        if size != len(binary):
            raise MalformedRequest(
                f"input {show(name)}: {BINARY_DATA_SIZE} is {size}, but {len(binary)} bytes of "
                "binary data follow the JSON object"
            )
        if "data" in tensor:
            raise MalformedRequest(f"input {show(name)} has both 'data' and {BINARY_DATA_SIZE!r}")
        x = from_binary(deployment, name, shape, datatype, binary, max_rows=max_rows)
    default = _parameter(doc, BINARY_DATA_OUTPUT, bool, "the request") or False
    wanted, binary_outputs = requested_outputs(doc.get("outputs"), default, deployment.outputs)
    return Request(request_id, x, wanted, binary_outputs)


def check_request_id(request_id: str, limit: int | None) -> None:
    """Refuse a client-chosen request id longer than `limit` bytes (UTF-8): it is echoed
    in the answer and logged with every sample (serving/inference_log.py)."""
    if limit is None or len(request_id) * 4 <= limit:  # no UTF-8 character is longer
        return
    size = len(request_id.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise MalformedRequest(
            f"the request id is {size} bytes; at most {limit} (serving.max_request_id_bytes)"
        )


def _parameter(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """A parameter of a request, input or output object (None when absent), of `kind`."""
    parameters = obj.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise MalformedRequest(f"{where}: 'parameters' must be an object")
    value: Any = parameters.get(key)
    if value is None:
        return None
    if kind is bool:
        wrong = not isinstance(value, bool)
    else:  # bool is an int to Python, not to JSON: a size of `true` is refused
        wrong = not isinstance(value, int) or isinstance(value, bool) or value < 0
    if wrong:
        raise MalformedRequest(f"{where}: parameter {key!r} must be a {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {int: "non-negative integer", bool: "boolean"}


def requested_outputs(
    outputs: Any, binary: bool = False, known: tuple[str, ...] = OUTPUTS
) -> tuple[tuple[str, ...], frozenset[str]]:
    """The outputs to answer (of the model's `known` ones), and those to answer as binary
    data (`binary`: the default of an output without the `binary_data` parameter)."""
    if outputs is None:
        return known, frozenset(known) if binary else frozenset()
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise MalformedRequest("'outputs' must be a list of objects with a 'name'")
    names = tuple(o["name"] for o in outputs)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(f"unknown output {show(unknown[0])}; outputs are {', '.join(known)}")
    chosen = {o["name"]: _parameter(o, BINARY_DATA, bool, f"output {o['name']!r}") for o in outputs}
    as_binary = frozenset(n for n, b in chosen.items() if (binary if b is None else b))
    if not names:
        return known, frozenset(known) if binary else frozenset()
    return names, as_binary


def _check_tensor(
    deployment: Deployment, name: Any, shape: Any, datatype: Any, max_rows: int | None
) -> tuple[int, int]:
    """The rows and values per row of an input tensor whose name, datatype and shape fit
    the card: [batch, features], or [batch, *shape] for a tensor model (and `max_rows`,
    checked before its data is read)."""
    n = deployment.n_features
    sample = deployment.sample_shape
    if len(sample) > 1:
        return _check_shaped(deployment, name, shape, datatype, max_rows)
    where = f"input {show(name)}"
    if name != INPUT:
        raise InvalidInput(f"{where}: model {deployment.name} takes one input named {INPUT!r}")
    if datatype not in NUMERIC:
        raise InvalidInput(
            f"{where}: datatype {show(datatype)} is not accepted; use FP32 (or FP64, INT*, UINT*)"
        )
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidInput(f"{where}: shape must be [batch, {n}], got {show(shape)}")
    rows, cols = shape
    if max_rows is not None and rows > max_rows:
        raise TooManyRows(
            f"{where}: {rows} rows; a request carries at most {max_rows} "
            "(serving.max_rows_per_request): split it"
        )
    if cols != n:
        raise InvalidInput(
            f"{where}: shape {shape} does not match the model's {n} features "
            f"({', '.join(deployment.features[:3])}, ...); expected [batch, {n}]"
        )
    if rows == 0:
        raise InvalidInput(f"{where}: empty batch (shape {shape})")
    return rows, cols


def _check_shaped(
    deployment: Deployment, name: Any, shape: Any, datatype: Any, max_rows: int | None
) -> tuple[int, int]:
    """`_check_tensor` for a model trained on a tensor column: exactly [batch, *shape]."""
    sample = deployment.sample_shape
    where = f"input {show(name)}"
    expected = f"[batch, {', '.join(map(str, sample))}]"
    if name != INPUT:
        raise InvalidInput(f"{where}: model {deployment.name} takes one input named {INPUT!r}")
    if datatype not in NUMERIC:
        raise InvalidInput(
            f"{where}: datatype {show(datatype)} is not accepted; use FP32 (or FP64, INT*, UINT*)"
        )
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or shape[1:] != sample
        or not shape
    ):
        raise InvalidInput(f"{where}: shape must be {expected}, got {show(shape)}")
    rows = shape[0]
    if max_rows is not None and rows > max_rows:
        raise TooManyRows(
            f"{where}: {rows} rows; a request carries at most {max_rows} "
            "(serving.max_rows_per_request): split it"
        )
    if rows == 0:
        raise InvalidInput(f"{where}: empty batch (shape {shape})")
    return rows, deployment.n_features


def to_array(
    deployment: Deployment,
    name: Any,
    shape: Any,
    datatype: Any,
    data: Any,
    *,
    max_rows: int | None = None,
) -> np.ndarray:
    """The input tensor as float32 [rows, features], checked against the model card (and
    `max_rows`, before its data is read)."""
    rows, cols = _check_tensor(deployment, name, shape, datatype, max_rows)
    where = f"input {show(name)}"
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: data must be a list of numbers")
    array = float64(data, f"{where}: data must hold only numbers (datatype {datatype})")
    if array.size != rows * cols:
        raise InvalidInput(
            f"{where}: data has {array.size} values, shape {shape} needs {rows * cols}"
        )
    return _float32(array, rows, cols, datatype, where)


def from_binary(
    deployment: Deployment,
    name: Any,
    shape: Any,
    datatype: Any,
    data: bytes,
    *,
    max_rows: int | None = None,
) -> np.ndarray:
    """An input tensor sent as binary data, as float32 [rows, features]: the same checks
    as `to_array` (an integer type's bytes cannot be out of its range; a float's can be NaN
    or infinite)."""
    rows, cols = _check_tensor(deployment, name, shape, datatype, max_rows)
    dtype = BINARY_DTYPES[datatype]
    if len(data) != rows * cols * dtype.itemsize:
        raise InvalidInput(
            f"input {show(name)}: {len(data)} bytes of binary data, shape {shape} of {datatype} "
            f"needs {rows * cols * dtype.itemsize}"
        )
    array = np.frombuffer(data, dtype=dtype).astype(np.float64)
    return _float32(array, rows, cols, datatype, f"input {show(name)}")


def _float32(array: np.ndarray, rows: int, cols: int, datatype: str, where: str) -> np.ndarray:
    """`array` (float64, the values as sent) as float32 [rows, features], refused if a value
    is NaN, infinite, not of its integer datatype, or beyond its float datatype's range."""
    with np.errstate(over="ignore"):  # overflow is reported just below, as a 400
        x = array.reshape(rows, cols).astype(np.float32)
        if datatype == "FP16":  # the values the client declared: FP16's, rounded or infinite
            x = x.astype(np.float16).astype(np.float32)
    # One check on the common path (finite in FP32, so finite in the input); the input is
    # looked at again only to say why a tensor is refused.
    finite = bool(np.isfinite(x).all())
    if not finite and not np.isfinite(array).all():
        raise InvalidInput(f"{where}: data contains NaN or infinite values")
    if datatype in _INT_RANGE:
        low, high = _INT_RANGE[datatype]
        if not (np.floor(array) == array).all() or array.min() < low or array.max() > high:
            raise InvalidInput(f"{where}: data does not fit datatype {datatype}")
    if not finite:
        limit = "FP16" if datatype == "FP16" else "FP32"
        raise InvalidInput(f"{where}: data exceeds the {limit} range")
    return x


def float64(values: list[Any], error: str) -> np.ndarray:
    """The numbers of `values` as a flat float64 array, or `InvalidInput(error)`.

    float64 first: values beyond float32's range must be caught, not silently made inf."""
    try:
        return np.frombuffer(struct.pack(f"{len(values)}d", *values), dtype=np.float64)
    except (struct.error, OverflowError):
        pass  # not a flat list of numbers: nested rows (OIP allows them), or not numbers
    try:
        return np.array(values, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(error) from None


def outputs(
    deployment: Deployment,
    probabilities: np.ndarray,
    names: Sequence[str] = OUTPUTS,
    labels: np.ndarray | None = None,
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """OIP output tensors (probabilities left as a numpy array for orjson) and the labels
    (a regression model's `probabilities` are its predictions [rows, 1])."""
    if labels is None:
        labels = deployment.labels(probabilities)
    rows, k = probabilities.shape
    out: list[dict[str, Any]] = []
    if deployment.regression:  # one output, whatever was asked (checked on decoding)
        data = probabilities.reshape(-1)
        out.append({"name": PREDICTION, "datatype": "FP32", "shape": [rows, 1], "data": data})
        return out, labels
    for name in names:
        if name == LABEL:
            out.append(
                {"name": LABEL, "datatype": "BYTES", "shape": [rows], "data": labels.tolist()}
            )
        else:
            out.append(
                {
                    "name": PROBABILITIES,
                    "datatype": "FP32",
                    "shape": [rows, k],
                    "data": probabilities.reshape(-1),
                }
            )
    return out, labels


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def encode_response(
    doc: dict[str, Any], binary: frozenset[str] = frozenset()
) -> tuple[bytes, int | None]:
    """The body of an infer answer, and the length of its JSON object when outputs follow
    it as binary data (`Inference-Header-Content-Length`; None for plain JSON). The
    outputs named in `binary` lose their `data` for a `binary_data_size` parameter."""
    chunks: list[bytes] = []
    if binary:
        for tensor in doc["outputs"]:
            if tensor["name"] in binary:
                raw = to_bytes(tensor["datatype"], tensor.pop("data"))
                tensor["parameters"] = {BINARY_DATA_SIZE: len(raw)}
                chunks.append(raw)
    head = dumps(doc)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def to_bytes(datatype: str, data: Any) -> bytes:
    """A tensor's values as binary data: BYTES elements each a 4-byte little-endian length
    and the UTF-8 bytes, numbers little-endian in their datatype's size."""
    if datatype == "BYTES":
        encoded = [str(v).encode() for v in data]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    return np.ascontiguousarray(data, dtype=BINARY_DTYPES[datatype]).tobytes()
