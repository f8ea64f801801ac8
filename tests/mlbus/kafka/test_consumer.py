"""The consumer loop against the real broker: every kind of bad record goes to the dead-letter
topic whole and the loop goes on, and no record is committed before its dead letter is
confirmed; binary-mode CloudEvents; handler errors (retry, dead-letter, raise); commits after
stop and after `max_events`; a clean shutdown on SIGTERM."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from mlbus.errors import InvalidEvent, TransientError
from mlbus.kafka.consumer import Backoff, ConsumerLoop
from mlbus.kafka.deadletter import MAX_COPIED_BYTES, original_value
from mlbus.schemas.catalog import DEADLETTER
from tests.mlbus.kafka.support import (
    LoopThread,
    Recorder,
    committed_offset,
    dataset,
    dead_letters,
    kafka_arg,
    lines,
    produce_raw,
    progress,
    publish,
    read_raw,
    run_to_end,
    wait_until,
)

KEY = b"digits"  # every record of a case has this key, so bad and good share a partition
FIVE_MB = 5 * 1024 * 1024


def _cloudevent(event_type: str, data: dict[str, Any], **attributes: Any) -> bytes:
    event = {"specversion": "1.0", "id": "bad-1", "source": "upstream/etl", "type": event_type}
    return json.dumps(event | attributes | {"data": data}).encode()


def _progress_data(**changes: Any) -> dict[str, Any]:
    data = progress().model_dump(mode="json") | changes
    return {k: v for k, v in data.items() if v is not None}


def _oversized() -> bytes:
    # A well-formed dataset.created whose size alone makes it invalid; random text, so that
    # compression does not hide the size on the way to the dead-letter topic.
    filler = base64.b64encode(os.urandom(FIVE_MB)).decode()[:FIVE_MB]
    value = _cloudevent(
        "dataset.created", dataset(description="").model_dump(mode="json") | {"description": filler}
    )
    assert len(value) > FIVE_MB
    return value


@dataclass(frozen=True)
class Bad:
    topic: str  # the event type of the topic the record is produced to
    value: bytes | Callable[[], bytes] | None  # a callable makes a big value when needed
    reason: str  # a fragment the dead letter's reason must contain
    producer: dict[str, Any] | None = None  # plain producer settings


BAD_RECORDS = {
    "not-json": Bad("dataset.created", b"name=digits,rows=10", "not valid JSON"),
    "binary-garbage": Bad(
        "dataset.created", b"\xff\xfe\x00\x01\x80\x81garbage\x00", "not valid JSON"
    ),
    "unknown-type": Bad(
        "dataset.created",
        _cloudevent("dataset.deleted", {"name": "digits"}),
        "unknown event type 'dataset.deleted'",
    ),
    "missing-field": Bad(
        "training.progress",
        _cloudevent("training.progress", _progress_data(epoch=None)),
        "data.epoch",
    ),
    "wrong-type": Bad(
        "training.progress",
        _cloudevent("training.progress", _progress_data(epoch="1")),
        "data.epoch: Input should be a valid integer",
    ),
    "five-megabytes": Bad(
        "dataset.created",
        _oversized,
        "over the 1048576-byte limit",
        producer={"message.max.bytes": 8 * 1024 * 1024},
    ),
    "event-of-another-topic": Bad(
        "dataset.created",
        _cloudevent("training.progress", _progress_data()),
        "event type 'training.progress' does not belong on topic 'dataset.created'",
    ),
    "no-value": Bad("dataset.created", None, "no value"),
}


def _good(event_type: str):  # type: ignore[no-untyped-def]
    return dataset() if event_type == "dataset.created" else progress()


@pytest.mark.parametrize("case", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_bad_record_is_dead_lettered_whole_and_the_loop_goes_on(kafka, group, case: Bad):
    value = case.value() if callable(case.value) else case.value
    handled = Recorder()
    loop = ConsumerLoop(
        kafka,
        group=group,
        name="bad-input",
        handlers={"dataset.created": handled, "training.progress": handled},
    )
    with LoopThread(loop) as running:
        bad = produce_raw(kafka, kafka.topic(case.topic), value, key=KEY, **(case.producer or {}))
        [good] = publish(kafka, [_good(case.topic)], key=KEY)  # same key: same partition, after
        wait_until(lambda: handled.ids, "the good record produced after the bad one")
        assert running.alive(), "the consumer loop ended"

    assert handled.ids == [good.id]
    assert handled.records[0][:2] == (bad.topic, bad.partition)
    assert handled.records[0][2] > bad.offset
    assert running.stats.handled == 1 and running.stats.deadlettered == 1
    letters = dead_letters(kafka)  # complete: the loop confirms dead letters before it ends
    assert len(letters) == 1, letters

    letter = letters[0]
    assert letter.type == DEADLETTER
    dead = letter.data
    assert case.reason in dead.reason
    assert dead.error_type == "InvalidEvent"
    assert (dead.consumer_group, dead.consumer) == (group, "bad-input")
    original = dead.original
    assert (original.topic, original.partition, original.offset) == (
        bad.topic,
        bad.partition,
        bad.offset,
    )
    assert base64.b64decode(original.key_b64 or "") == KEY
    if value is None:
        assert original.value_size == 0 and original.value_sha256 is None
        assert original_value(dead) is None
    else:
        assert original.value_size == len(value)
        assert original.value_sha256 == hashlib.sha256(value).hexdigest()
        assert len(value) <= MAX_COPIED_BYTES  # so the bytes themselves must be in the letter
        assert original_value(dead) == value


def test_dead_letter_keeps_key_and_headers_and_its_record_is_committed(kafka, group):
    headers = [("content-type", b"application/cloudevents+json"), ("trace", b"\x00\x01")]
    bad = produce_raw(
        kafka, kafka.topic("dataset.created"), b"{not json", key=b"iris", headers=headers
    )
    first = run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": Recorder()}))
    assert first.deadlettered == 1
    [message] = read_raw(kafka, kafka.topic(DEADLETTER))
    assert message.key() == b"iris"  # the dead-letter topic is keyed by the original key
    assert dict(message.headers() or [])["content-type"] == b"application/cloudevents+json"
    letter = json.loads(message.value())
    original = letter["data"]["original"]
    assert original["offset"] == bad.offset
    assert [(h["key"], base64.b64decode(h["value_b64"])) for h in original["headers"]] == headers
    assert letter["partitionkey"] == "iris"


def test_dead_letter_carries_the_conventional_headers_generic_tools_read(kafka, group):
    bad = produce_raw(kafka, kafka.topic("dataset.created"), b"{not json", key=b"iris")
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": Recorder()}))
    [message] = read_raw(kafka, kafka.topic(DEADLETTER))
    headers = dict(message.headers() or [])
    # Kafka Connect's dead-letter-queue header names, values as UTF-8 text.
    assert headers["__connect.errors.topic"] == bad.topic.encode()
    assert headers["__connect.errors.partition"] == str(bad.partition).encode()
    assert headers["__connect.errors.offset"] == str(bad.offset).encode()
    assert headers["__connect.errors.exception.class.name"] == b"InvalidEvent"
    assert b"not valid JSON" in headers["__connect.errors.exception.message"]
    assert headers["content-type"] == b"application/cloudevents+json"  # still a CloudEvent

    again = run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": Recorder()}))
    assert again.deadlettered == 0, "dead-lettered record came again: offset not committed"
    assert len(dead_letters(kafka)) == 1


def test_a_dead_letter_the_broker_does_not_confirm_is_not_lost(kafka, group, caplog):
    """Nothing is dropped silently: a record's offset may be committed only once its dead
    letter is confirmed; until then the loop retries, and still stops when asked."""
    caplog.set_level(logging.WARNING, logger="mlbus")
    bad = produce_raw(kafka, kafka.topic("dataset.created"), b"not json", key=KEY)
    # The fault: every dead letter expires before the broker confirms it (a new idempotent
    # producer needs ~0.5 s for its producer id; these records expire after 10 ms). The
    # setting is a producer one: the consumer ignores it.
    faulty = replace(kafka, extra={"message.timeout.ms": "10"})
    loop = ConsumerLoop(
        faulty, group=group, handlers={"dataset.created": Recorder()}, backoff=Backoff(0.05)
    )
    running = LoopThread(loop, stop_at_end=True).start()

    def retries() -> int:
        return sum("not delivered" in r.getMessage() for r in caplog.records)

    wait_until(
        lambda: not running.alive() or retries() >= 2,
        "the loop to end, or to retry the dead letter it could not deliver",
    )
    delivered = dead_letters(kafka)
    committed = committed_offset(kafka, group, bad.topic, bad.partition)
    assert delivered or committed is None or committed <= bad.offset, (
        f"offset {committed} was committed past the bad record ({bad.partition}@{bad.offset}) "
        f"although its dead letter never reached {DEADLETTER}: the record is lost"
    )
    running.stop()  # must end when asked (as on SIGTERM) while dead letters are unconfirmed


def test_binary_mode_cloudevent_is_dispatched_as_a_typed_event(kafka, group):
    payload = dataset(name="iris", num_rows=150)
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"binary-1"),
        ("ce_source", b"upstream/etl"),
        ("ce_type", b"dataset.created"),
        ("ce_time", b"2026-11-21T12:00:00Z"),
        ("ce_correlationid", b"run-7"),
        ("content-type", b"application/json"),
    ]
    produce_raw(
        kafka,
        kafka.topic("dataset.created"),
        payload.model_dump_json(),
        key=b"iris",
        headers=headers,
    )
    handled = Recorder()
    stats = run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": handled}))

    assert stats.deadlettered == 0, dead_letters(kafka)
    [event] = handled.events
    assert (event.id, event.type, event.source) == ("binary-1", "dataset.created", "upstream/etl")
    assert event.correlationid == "run-7"
    assert event.time is not None and event.time.isoformat() == "2026-11-21T12:00:00+00:00"
    assert event.data == payload


# -- handler errors -------------------------------------------------------------------------


def test_transient_errors_are_retried_in_place_and_nothing_is_skipped(kafka, group):
    # Same key: one partition, in this order; other keys: records in the other partitions
    # arrive while the first one is being retried (and its partitions are paused).
    refs = publish(kafka, [dataset(version=f"v{i}") for i in range(3)])
    others = publish(kafka, [dataset(name=f"other{i}") for i in range(9)])
    first = refs[0].id

    def flaky(event, attempt: int) -> None:
        if event.id == first and attempt <= 2:
            raise TransientError("object store down")

    handled = Recorder(fail=flaky)
    loop = ConsumerLoop(
        kafka, group=group, handlers={"dataset.created": handled}, backoff=Backoff(initial=0.05)
    )
    stats = run_to_end(loop)

    assert handled.calls[first] == 3
    assert stats.retries == 2 and stats.deadlettered == 0
    assert dead_letters(kafka) == []
    assert sorted(handled.ids) == sorted(r.id for r in refs + others), "skipped or repeated"
    assert stats.handled == len(refs) + len(others)
    assert [i for i in handled.ids if i in {r.id for r in refs}] == [r.id for r in refs]
    for partition in {p for _, p, _ in handled.records}:  # every partition read in order
        offsets = [o for _, p, o in handled.records if p == partition]
        assert offsets == sorted(offsets), f"partition {partition} handled out of order"


def test_handler_raising_invalid_event_is_dead_lettered(kafka, group):
    [ref] = publish(kafka, [dataset(name="unknown-model")])

    def refuse(event, attempt: int) -> None:
        raise InvalidEvent("data.name: no such dataset in the registry")

    stats = run_to_end(
        ConsumerLoop(kafka, group=group, handlers={"dataset.created": Recorder(fail=refuse)})
    )
    assert stats.deadlettered == 1 and stats.handled == 0
    [letter] = dead_letters(kafka)
    assert letter.data.error_type == "InvalidEvent"
    assert letter.data.reason == "data.name: no such dataset in the registry"
    assert json.loads(original_value(letter.data) or b"")["id"] == ref.id


def _boom_on(event_id: str) -> Callable[[Any, int], None]:
    def fail(event: Any, attempt: int) -> None:
        if event.id == event_id:
            raise ValueError("boom")

    return fail


def test_unexpected_handler_error_is_dead_lettered_with_its_type(kafka, group):
    ref, after = publish(kafka, [dataset(), dataset(version="v2")])
    handled = Recorder(fail=_boom_on(ref.id))
    stats = run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": handled}))

    assert stats.deadlettered == 1 and handled.ids == [after.id]
    [letter] = dead_letters(kafka)
    assert letter.data.error_type == "ValueError"
    assert "boom" in letter.data.reason
    assert json.loads(original_value(letter.data) or b"")["id"] == ref.id


def test_unexpected_handler_error_is_raised_when_asked_and_not_committed(kafka, group):
    done, failing = publish(kafka, [dataset(version="v1"), dataset(version="v2")])  # in order
    handlers = {"dataset.created": Recorder(fail=_boom_on(failing.id))}
    loop = ConsumerLoop(kafka, group=group, handlers=handlers, on_handler_error="raise")
    with pytest.raises(ValueError, match="boom"):
        run_to_end(loop)
    assert dead_letters(kafka) == []

    handled = Recorder()  # what was handled before the error is committed, the failed one not
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": handled}))
    assert handled.ids == [failing.id], f"only the failed one should come again, not {done.id}"


# -- commits ----------------------------------------------------------------------------------


def _publish(kafka, count: int, start: int = 0) -> list[str]:  # type: ignore[no-untyped-def]
    """Publish `count` events with distinct keys (so over several partitions); their ids."""
    payloads = [dataset(name=f"ds{i}") for i in range(start, start + count)]
    return [ref.id for ref in publish(kafka, payloads)]


def test_a_stopped_loop_has_committed_what_it_handled(kafka, group):
    ids = _publish(kafka, 6)  # several keys: several partitions
    first = Recorder()
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": first}))
    assert sorted(first.ids) == sorted(ids)

    second = Recorder()
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": second}))
    assert second.ids == [], "records handled and committed by the first loop came again"

    later = _publish(kafka, 2, start=6)
    third = Recorder()
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": third}))
    assert sorted(third.ids) == sorted(later)


def test_max_events_handles_exactly_that_many_and_the_group_gets_the_rest(kafka, group):
    ids = _publish(kafka, 12)
    first = Recorder()
    loop = ConsumerLoop(kafka, group=group, handlers={"dataset.created": first})
    stats = LoopThread(loop, max_events=5).start().join()
    assert stats.handled == 5 and len(first.ids) == 5

    rest = Recorder()
    run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": rest}))
    everything = first.ids + rest.ids
    assert sorted(everything) == sorted(ids), "lost or duplicated records"


# -- SIGTERM ----------------------------------------------------------------------------------

SIGTERM_CONSUMER = '''\
"""Appends the id of every event it handles to a file; slow enough to be stopped midway."""
import json
import sys
import time

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop

kafka = KafkaConfig(**json.loads(sys.argv[1]))
group, out, delay, mode = sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]


def handle(event, record):
    with open(out, "a") as f:
        f.write(event.id + "\\n")
    time.sleep(delay)


loop = ConsumerLoop(kafka, group=group, handlers={"dataset.created": handle}, name="sigterm")
stats = loop.run(stop_at_end=mode == "to-end")
print("stopped:", stats, flush=True)
'''


def test_sigterm_stops_cleanly_and_a_restart_continues_where_it_left_off(
    kafka, group, tmp_path, spawn
):
    ids = _publish(kafka, 150)
    first_out, second_out = tmp_path / "first.txt", tmp_path / "second.txt"
    first = spawn(SIGTERM_CONSUMER, [kafka_arg(kafka), group, str(first_out), "0.02", "forever"])
    wait_until(
        lambda: len(lines(first_out)) >= 15 or not first.running(),
        lambda: f"the consumer to handle 15 events; log:\n{first.log()}",
    )
    assert first.running(), f"the consumer ended by itself:\n{first.log()}"
    first.process.send_signal(signal.SIGTERM)
    assert first.wait(15) == 0, first.log()
    before = lines(first_out)
    assert 0 < len(before) < len(ids), "precondition: SIGTERM arrived while consuming"

    second = spawn(SIGTERM_CONSUMER, [kafka_arg(kafka), group, str(second_out), "0", "to-end"])
    assert second.wait() == 0, second.log()
    after = lines(second_out)

    assert set(before) | set(after) == set(ids), "an event was lost"
    duplicates = len(before) + len(after) - len(set(before + after))
    assert duplicates == 0, f"{duplicates} event(s) handled twice after a clean shutdown"
