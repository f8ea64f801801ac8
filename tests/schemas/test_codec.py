"""The codec: typed events to bytes and back, and every way a record can be wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlbus.errors import InvalidEvent, UnknownTopic
from mlbus.schemas.codec import decode, decode_dict, decode_payload, encode, encode_new, wrap
from mlbus.schemas.datasets import ColumnSchema, DatasetCreated
from mlbus.schemas.training import TrainingProgress, TrainingRequested

SHA = "sha256:" + "ab" * 32


def progress(**changes) -> TrainingProgress:
    fields = dict(
        run_id="r1",
        model="digits",
        epoch=1,
        max_epochs=3,
        metrics={"loss": 0.5},
        samples_per_second=100.0,
    )
    return TrainingProgress(**(fields | changes))


def dataset(**changes) -> DatasetCreated:
    fields = dict(
        name="digits",
        version="v1",
        uri="file:///tmp/d.parquet",
        content_hash=SHA,
        arrow_schema=[ColumnSchema(name="x", type="double")],
        num_rows=10,
        num_bytes=100,
    )
    return DatasetCreated(**(fields | changes))


def envelope(**changes) -> bytes:
    event = {
        "specversion": "1.0",
        "id": "e1",
        "source": "test",
        "type": "training.progress",
        "data": progress().model_dump(mode="json"),
    }
    for key, value in changes.items():
        if key.startswith("data_"):
            event["data"][key[5:]] = value
        else:
            event[key] = value
    return json.dumps(event).encode()


def test_round_trip_keeps_type_payload_and_envelope():
    event = wrap(progress(), source="mlbus/test", subject="digits")
    back = decode(encode(event))
    assert type(back).__name__ == "TrainingProgressEvent"
    assert back == event
    assert back.data == progress()
    assert back.dataschema == "mlbus:schemas/training.progress/1"


def test_wrap_chains_correlation_and_causation():
    first = wrap(dataset(), source="a")
    assert first.correlationid == first.id and first.causationid is None
    second = wrap(progress(), source="b", causation=first)
    assert second.correlationid == first.id
    assert second.causationid == first.id
    third = wrap(progress(), source="c", causation=second)
    assert third.correlationid == first.id and third.causationid == second.id


def test_optional_attributes_are_omitted_not_null():
    body = orjson.loads(encode(wrap(progress(), source="s")))
    assert "subject" not in body and "causationid" not in body
    assert None not in body.values()


@settings(max_examples=200, deadline=None)
@given(
    epoch=st.integers(min_value=0, max_value=2**40),
    loss=st.floats(allow_nan=False, allow_infinity=False),
    subject=st.one_of(st.none(), st.text(max_size=20)),
    micro=st.integers(min_value=0, max_value=999_999),
    with_cause=st.booleans(),
)
def test_fast_encoder_is_byte_identical_to_the_model(epoch, loss, subject, micro, with_cause):
    payload = progress(epoch=epoch, metrics={"loss": loss})
    when = datetime(2026, 3, 1, 14, 0, 0, micro, tzinfo=UTC)
    cause = wrap(dataset(), source="up") if with_cause else None
    ref, fast = encode_new(
        payload, source="s", subject=subject, causation=cause, event_id="id-1", time=when
    )
    slow = encode(
        wrap(payload, source="s", subject=subject, causation=cause, event_id="id-1", time=when)
    )
    assert fast == slow
    assert (ref.id, ref.type, ref.key) == ("id-1", "training.progress", "digits")


def test_binary_mode_is_accepted():
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"b1"),
        ("ce_source", b"kcat"),
        ("ce_type", b"training.progress"),
        ("ce_time", b"2026-03-01T14:00:00Z"),
        ("content-type", b"application/json"),
    ]
    value = progress().model_dump_json().encode()
    with pytest.raises(InvalidEvent):
        decode(value)  # without its headers a bare payload is not an event
    event = decode(value, headers)
    assert event.id == "b1" and event.source == "kcat" and event.data == progress()


BINARY_HEADERS = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"b1"),
    ("ce_source", b"kcat"),
    ("ce_type", b"training.progress"),
    ("ce_partitionkey", b"digits"),
    ("content-type", b"application/json"),
]


def test_the_content_type_header_picks_structured_mode_over_ce_headers():
    # The Kafka binding: `content-type: application/cloudevents…` is structured mode, whatever
    # other headers say; a bare payload there is not an event, not a binary-mode one.
    headers = [*BINARY_HEADERS[:-1], ("Content-Type", b"application/cloudevents+json")]
    with pytest.raises(InvalidEvent, match=r"specversion|id|source|type"):
        decode(progress().model_dump_json().encode(), headers)
    assert decode(encode(wrap(progress(), source="s")), headers).source == "s"


def test_ce_headers_pick_binary_mode_and_the_value_is_only_the_data():
    # A binary-mode record is parsed once, as binary: a value that would also read as a
    # structured event is the data of the headers' event (and here not a valid payload).
    structured = encode(wrap(progress(), source="structured"))
    with pytest.raises(InvalidEvent, match="binary mode: data"):
        decode(structured, BINARY_HEADERS)
    event = decode(progress().model_dump_json().encode(), BINARY_HEADERS)
    assert (event.id, event.source, event.partitionkey) == ("b1", "kcat", "digits")
    as_dict = decode_dict(
        progress().model_dump_json().encode(), BINARY_HEADERS, expected_type="training.progress"
    )
    assert as_dict == event.model_dump()


def test_every_event_carries_its_record_key_as_partitionkey():
    assert wrap(progress(), source="s").partitionkey == "digits"
    ref, value = encode_new(dataset(name="iris"), source="s")
    assert ref.key == "iris" and orjson.loads(value)["partitionkey"] == "iris"
    ref, value = encode_new(progress(), source="s", partitionkey="other")
    assert ref.key == "other" and decode(value).partitionkey == "other"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00\x01garbage", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (envelope(type="model.exploded"), "unknown event type 'model.exploded'"),
        (
            json.dumps({"specversion": "1.0", "id": "x", "source": "s", "data": {}}).encode(),
            "type: missing",
        ),
        (envelope(data_epoch="1"), "data.epoch: Input should be a valid integer"),
        (envelope(data_epoch=-1), "data.epoch"),
        (envelope(specversion="0.3"), "specversion"),
        (envelope(id=""), "id"),
        (envelope(time="yesterday"), "time"),
    ],
)
def test_invalid_records_name_the_problem(value, reason):
    with pytest.raises(InvalidEvent) as caught:
        decode(value)
    assert reason in caught.value.reason


def test_missing_field_is_named():
    body = json.loads(envelope())
    del body["data"]["run_id"]
    with pytest.raises(InvalidEvent, match=r"data\.run_id: Field required"):
        decode(json.dumps(body).encode())


def test_oversized_record_is_refused_before_parsing():
    with pytest.raises(InvalidEvent, match="over the 1024-byte limit"):
        decode(b"{" + b" " * 2000 + b"}", max_bytes=1024)


def test_tombstone_is_not_an_event():
    with pytest.raises(InvalidEvent, match="no value"):
        decode(None)


def test_event_on_the_wrong_topic_is_invalid():
    value = encode(wrap(progress(), source="s"))
    with pytest.raises(InvalidEvent, match=r"does not belong on topic 'dataset\.created'"):
        decode(value, expected_type="dataset.created")


def test_unknown_envelope_extensions_and_payload_fields_are_tolerated():
    # Forward compatibility: a newer producer may add extension attributes and optional fields.
    event = decode(envelope(traceparent="00-abc", data_new_field=1))
    assert event.model_extra == {"traceparent": "00-abc"}
    assert event.data == progress()


def test_decode_payload_for_publishing_is_strict_about_unknown_fields():
    assert decode_payload("training.progress", progress().model_dump_json()) == progress()
    with pytest.raises(InvalidEvent, match=r"data\.epochs: not a field of training.progress"):
        decode_payload("training.progress", json.dumps(progress().model_dump() | {"epochs": 1}))
    with pytest.raises(InvalidEvent, match=r"data\.model"):
        decode_payload(
            "training.requested", b'{"dataset": {"name": "d", "version": "1"}, "family": "mlp"}'
        )
    with pytest.raises(InvalidEvent, match="unknown event type"):
        decode_payload("nope", b"{}")


def test_names_are_validated():
    with pytest.raises(ValueError, match="model"):
        TrainingRequested(model="../etc", dataset={"name": "d", "version": "1"}, family="mlp")


def test_payloads_are_frozen():
    with pytest.raises(ValueError):
        progress().epoch = 5  # type: ignore[misc]


def test_wrapping_a_foreign_model_is_refused():
    from mlbus.schemas.base import Payload

    class Stray(Payload):
        x: int

    with pytest.raises(UnknownTopic):
        wrap(Stray(x=1), source="s")
