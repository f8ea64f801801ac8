"""Open Inference Protocol v2 tensors in and out: the request body (orjson) or a stream
request's `Tensor`s become one float32 array checked against the model card, and the
forward pass's probabilities become the `label` and `probabilities` outputs.

The flat `data` list becomes an array in C, with no Python loop over its elements (packed as
doubles by `struct`: three times faster than `np.array(list)`, which first walks the list to
discover its shape); orjson writes the probabilities straight from the numpy array.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from mlbus.serving.errors import InvalidInput, MalformedRequest, TooManyRows
from mlbus.serving.registry import INPUT, LABEL, PROBABILITIES, Deployment

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


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded inference request: the input rows and what to answer."""

    id: str | None
    x: np.ndarray  # float32 [rows, features], finite
    outputs: tuple[str, ...]


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise MalformedRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise MalformedRequest("the body must be a JSON object with an 'inputs' list")
    return doc


def decode_request(
    doc: Mapping[str, Any],
    deployment: Deployment,
    *,
    max_rows: int | None = None,
    max_id_bytes: int | None = None,
) -> Request:
    """Check an OIP request object against the deployment's card; `InvalidInput`,
    `MalformedRequest` or `TooManyRows` (each naming the input, field or limit) if it does
    not fit."""
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise MalformedRequest("'id' must be a string")
        check_request_id(request_id, max_id_bytes)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise MalformedRequest("'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:
        names = [i.get("name") if isinstance(i, dict) else None for i in inputs[:SHOWN]]
        raise InvalidInput(
            f"model {deployment.name} takes one input {INPUT!r}, got {len(inputs)}: {show(names)}"
        )
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise MalformedRequest("each input must be an object with name, shape, datatype, data")
    x = to_array(
        deployment,
        tensor.get("name"),
        tensor.get("shape"),
        tensor.get("datatype"),
        tensor.get("data"),
        max_rows=max_rows,
    )
    return Request(request_id, x, requested_outputs(doc.get("outputs")))


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


def requested_outputs(outputs: Any) -> tuple[str, ...]:
    if outputs is None:
        return OUTPUTS
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise MalformedRequest("'outputs' must be a list of objects with a 'name'")
    names = tuple(o["name"] for o in outputs)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise InvalidInput(f"unknown output {show(unknown[0])}; outputs are {', '.join(OUTPUTS)}")
    return names or OUTPUTS


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
    n = deployment.n_features
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
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: data must be a list of numbers")
    array = float64(data, f"{where}: data must hold only numbers (datatype {datatype})")
    if array.size != rows * cols:
        raise InvalidInput(
            f"{where}: data has {array.size} values, shape {shape} needs {rows * cols}"
        )
    with np.errstate(over="ignore"):  # overflow is reported just below, as a 400
        x = array.reshape(rows, cols).astype(np.float32)
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
        raise InvalidInput(f"{where}: data exceeds the FP32 range")
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
    """OIP output tensors (probabilities left as a numpy array for orjson) and the labels."""
    if labels is None:
        labels = deployment.classes[probabilities.argmax(axis=1)]
    rows, k = probabilities.shape
    out: list[dict[str, Any]] = []
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
