"""The streams app's decode of inference.logged (streams/logged.py) against the codec's: the
same values for what the engine reads, the same refusals and reasons for a record broken in
a field the engine reads, and a processor that dead-letters such a record with that reason
and goes on."""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from mlbus.errors import InvalidEvent
from mlbus.schemas.codec import decode_dict, encode_new
from mlbus.schemas.deadletter import DeadLetter
from mlbus.schemas.serving import InferenceLogged
from mlbus.streams import windows
from mlbus.streams.logged import ENVELOPE_READ, READ, logged_decoder
from tests.streams.support import encoded, history
from tests.streams.test_processor import Record, make

TYPE = "inference.logged"


def record(**data: Any) -> dict[str, Any]:
    payload = {
        "request_id": "r1",
        "model": "clf",
        "version": "v1",
        "replica": "a",
        "latency_seconds": 0.02,
    } | data
    return {
        "specversion": "1.0",
        "id": "e1",
        "source": "tests",
        "type": TYPE,
        "time": "2026-01-01T00:00:01.250Z",
        "data": payload,
    }


def valid_values() -> list[bytes]:
    """Records of the test history, and one of each form the contract allows."""
    values = [value for _, value in encoded(history(total=300, windows=3))]
    full = InferenceLogged(
        request_id="r",
        model="clf",
        version="v2",
        replica="a",
        latency_seconds=0.5,
        ok=False,
        error="boom",
        status=422,
        batch_size=3,
        predictions=[1, 2.5, "x"],
        feature_names=["f0", "f1"],
        inputs=[[1.0, 2.0], [3.5, -1.0]],
        shadow=True,
        answered_by="v1",
        agreement=0.75,
    )
    values.append(encode_new(full, source="t", time=datetime(2026, 1, 1, tzinfo=UTC))[1])
    forms = [
        record(),
        record(latency_seconds=3),  # an int where a float is written: the contract converts it
        record(ok=False),  # no status: an older server's failure
        record(predictions=[]),
        record(feature_names=None, inputs=None),
        record(unknown_field=1),  # ignored, as by the contract
    ]
    no_time = record()
    del no_time["time"]
    offset = record()
    offset["time"] = "2026-01-01T01:00:00.123456+01:00"
    values += [orjson.dumps(v) for v in [*forms, no_time, offset]]
    return values


def test_the_engine_gets_the_values_the_codec_gives() -> None:
    decode = logged_decoder()
    for value in valid_values():
        fast, full = decode(value), decode_dict(value, expected_type=TYPE)
        assert fast.get("time") == full["time"]
        assert fast["type"] == full["type"]
        for name in READ:
            assert fast["data"][name] == full["data"][name], name
            assert type(fast["data"][name]) is type(full["data"][name]), name


BROKEN_READ = [
    record(model=""),
    record(model="has space"),
    record(model="x" * 129),
    record(model=1),
    record(version=""),
    record(latency_seconds=-0.1),
    record(latency_seconds="0.1"),
    record(latency_seconds=None),
    record(ok=1),
    record(ok=None),
    record(status=700),
    record(status=True),
    record(status=4.5),
    record(agreement=1.5),
    record(agreement=True),
    record(predictions=[True]),
    record(predictions=[None]),
    record(predictions="a"),
    record(feature_names=["f0", 1]),
    record(inputs=[[1.0, "x"]]),
    record(inputs=[1.0]),
    record(inputs=[[True]]),
    {**record(), "time": "yesterday"},
    {**record(), "time": 1767225600},
    {**record(), "type": "inference.feedback"},
    {**record(), "data": "nope"},
    {k: v for k, v in record().items() if k != "data"},
]


@pytest.mark.parametrize("event", BROKEN_READ, ids=lambda e: orjson.dumps(e)[-70:].decode())
def test_a_record_broken_where_the_engine_reads_is_refused_with_the_codecs_reason(
    event: dict[str, Any],
) -> None:
    value = orjson.dumps(event)
    with pytest.raises(InvalidEvent) as codec:
        decode_dict(value, expected_type=TYPE)
    with pytest.raises(InvalidEvent) as ours:
        logged_decoder()(value)
    assert ours.value.reason == codec.value.reason


@pytest.mark.parametrize("value", [None, b"", b"not json", b"[]", b"x" * 2000])
def test_what_is_not_an_event_is_refused_with_the_codecs_reason(value: bytes | None) -> None:
    with pytest.raises(InvalidEvent) as codec:
        decode_dict(value, expected_type=TYPE, max_bytes=1000)
    with pytest.raises(InvalidEvent) as ours:
        logged_decoder(max_bytes=1000)(value)
    assert ours.value.reason == codec.value.reason


def test_a_record_broken_where_the_engine_does_not_read_is_refused_too() -> None:
    """An empty request_id cannot change a window, but the record is invalid: dead-lettered
    with the codec's reason, never aggregated."""
    event = orjson.dumps(record(request_id="", replica=""))
    with pytest.raises(InvalidEvent) as codec:
        decode_dict(event, expected_type=TYPE)
    with pytest.raises(InvalidEvent) as ours:
        logged_decoder()(event)
    assert ours.value.reason == codec.value.reason


def _keys_read(function: Any) -> set[str]:
    """The payload keys `function` reads: `data[...]`, `data.get(...)` and `get(...)` with
    a constant (Agg.add binds `get = data.get`)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    keys: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "data"
            and isinstance(node.slice, ast.Constant)
        ):
            keys.add(node.slice.value)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "get") or (
                isinstance(f, ast.Attribute)
                and f.attr == "get"
                and isinstance(f.value, ast.Name)
                and f.value.id == "data"
            ):
                keys.add(node.args[0].value)
    return keys


def test_read_covers_every_payload_field_the_engine_reads() -> None:
    read = _keys_read(windows.Engine.apply) | _keys_read(windows.Agg.add)
    assert {"model", "version", "latency_seconds", "inputs"} <= read  # the walk finds them
    assert read <= READ
    assert set(READ) <= set(InferenceLogged.model_fields)
    assert {"type", "time", "id", "source"} <= ENVELOPE_READ
    assert set(READ) == set(InferenceLogged.model_fields)


def test_the_processor_dead_letters_a_broken_record_with_its_reason_and_goes_on() -> None:
    processor, _, outputs = make()
    published: list[Any] = []
    outputs.publish = lambda payload, **_: published.append(payload)  # type: ignore[method-assign]
    good = [value for _, value in encoded(history(total=40, windows=2))]
    broken = orjson.dumps(record(latency_seconds=-1.0))
    values = [*good[:20], broken, *good[20:]]
    messages = [Record("t", 0, i, None, b"k", v, []) for i, v in enumerate(values)]
    asyncio.run(processor.handle(messages))
    assert (processor.processed, processor.deadlettered) == (len(good), 1)
    letters = [p for p in published if isinstance(p, DeadLetter)]
    assert len(letters) == 1
    assert letters[0].original.offset == 20 and letters[0].consumer == "streams"
    assert letters[0].reason == reason_of(broken)
    assert "latency_seconds" in letters[0].reason


def reason_of(value: bytes) -> str:
    with pytest.raises(InvalidEvent) as codec:
        decode_dict(value, expected_type=TYPE)
    return codec.value.reason
