"""Poison on every consumed topic: each long-running service of the manifests
(mlbus/services.py) runs as `mlbus run <name>` against the session broker, and every topic
any of them reads gets records that cannot be decoded or validated as events. Each record a
service consumes in its group is dead-lettered by that group with a reason naming the
problem; records read group-less (log views) are skipped; no service exits, every group
moves past the poison, and valid events sent afterwards are still processed.

The topics and the expectations are derived from the manifests: a new service, or a new
topic in a service's `reads`, is poisoned here without a change to this file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.base import DatasetRef, Tensor
from mlbus.schemas.catalog import DEADLETTER
from mlbus.schemas.codec import STRUCTURED_HEADERS, decode, encode_new
from mlbus.schemas.envelope import Event
from mlbus.schemas.errors import InvalidEvent
from mlbus.schemas.models import ModelPromoted, ModelRejected
from mlbus.schemas.serving import InferenceRequest
from mlbus.schemas.training import Artifact, TrainingRequested
from mlbus.services import SERVICES, Service
from tests.mlbus.kafka.support import (
    dead_letters,
    read_raw,
    wait_until,
)

pytestmark = pytest.mark.integration

MLBUS = str(Path(sys.executable).parent / "mlbus")
#: The event size limit the services run with: the oversize poison is just above it.
MAX_EVENT_BYTES = 64 * 1024
#: Topics a service reads group-less, through a log view of the whole topic (its state at
#: start, a baseline), not in its consumer group: an undecodable record there is skipped with
#: a warning, not dead-lettered (mlbus/kafka/logview.py). Entries for topics a service does
#: not read are ignored. A topic missing here is expected to be dead-lettered: the test says
#: so when it is not.
READ_GROUPLESS: dict[str, frozenset[str]] = {
    "validator": frozenset({"dataset.validated"}),
    "trainer": frozenset({"dataset.created", "dataset.validated"}),
    "workflow": frozenset({"dataset.created", "model.rejected"}),
    "serve": frozenset({"model.promoted", "model.traffic", "deployment.updated"}),
    "streams": frozenset(
        {
            "dataset.created",
            "dataset.validated",
            "training.completed",
            "model.promoted",
            # the feedback join folds it from the beginning (streams/feedback.py)
            "inference.feedback",
        }
    ),
    "openlineage": frozenset({"training.requested"}),
}
SHA = "sha256:" + "ab" * 32


# -- the poison -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    kind: str
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    reason: tuple[str, ...]
    """fragments the dead letter's reason must contain"""


def _envelope(event_type: str, data: object) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "probe",
            "type": event_type,
            "time": "2026-03-01T14:00:00Z",
            "datacontenttype": "application/json",
            "data": data,
        }
    ).encode()


def _foreign_event(topic: str) -> tuple[str, bytes]:
    """A valid event of another topic than `topic`: its type, its record value."""
    decision = dict(model="probe", version="1", reason="probe", actor="probe")
    payload = ModelRejected(**decision) if topic != "model.rejected" else ModelPromoted(**decision)
    ref, value = encode_new(payload, source="probe")
    return ref.type, value


def poisons(topic: str) -> list[Poison]:
    """Every kind of record the contract refuses, for `topic`."""
    other, foreign = _foreign_event(topic)
    binary = (("ce_specversion", b"1.0"), ("ce_id", b"p-1"), ("ce_source", b"probe"))
    return [
        Poison("not JSON", b"this is not JSON {", (), ("not valid JSON",)),
        Poison("binary garbage", b"\xff\xfe\x00\x01\x80\x81garbage", (), ("not valid JSON",)),
        Poison("JSON array", b"[1, 2, 3]", (), ("not a JSON object",)),
        Poison("JSON, no envelope", b'{"hello": "world"}', (), ("type: missing",)),
        Poison(
            "unknown type",
            _envelope("model.exploded", {}),
            (),
            ("unknown event type 'model.exploded'",),
        ),
        Poison(
            "another topic's event",
            foreign,
            (),
            (f"event type {other!r} does not belong on topic {topic!r}",),
        ),
        Poison("payload failing validation", _envelope(topic, {}), (), ("data.", "Field required")),
        Poison(
            "oversize",
            b'{"pad": "' + b"x" * MAX_EVENT_BYTES + b'"}',
            (),
            (f"over the {MAX_EVENT_BYTES}-byte limit",),
        ),
        Poison("tombstone", None, (), ("no value",)),
        Poison(
            "binary mode, not JSON content type",
            b'{"a": 1}',
            (*binary, ("ce_type", topic.encode()), ("content-type", b"application/x-pickle")),
            ("non-JSON content type 'application/x-pickle'",),
        ),
        Poison(
            "garbage headers",
            b"\x00\x01 not an event",
            (
                *binary,
                ("ce_type", b"\xff\xfe"),
                ("content-type", b"\x80\x81"),
                ("x-junk", os.urandom(300 * 1024)),
            ),
            ("non-JSON content type", "not copied"),
        ),
    ]


def poisoned_topics() -> list[str]:
    """Every topic some service reads (dead letters are not poisoned: they are the output)."""
    return sorted({t for s in SERVICES for t in s.reads} - {DEADLETTER})


def dead_lettering(s: Service) -> bool:
    return s.group and DEADLETTER in s.writes


def group_read(s: Service) -> list[str]:
    """The topics `s` consumes in its consumer group."""
    if not s.group:
        return []
    skipped = READ_GROUPLESS.get(s.name, frozenset())
    return sorted(t for t in s.reads if t != DEADLETTER and t not in skipped)


@dataclass(frozen=True)
class Sent:
    poison: Poison
    topic: str
    offset: int


def send_poison(kafka: KafkaConfig) -> list[Sent]:
    """Every poison to partition 0 of every poisoned topic, in order."""
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap, "linger.ms": 5, "message.max.bytes": 4_000_000}
    )
    sent: list[Sent] = []
    failures: list[object] = []
    for topic in poisoned_topics():
        for poison in poisons(topic):

            def delivered(err, msg, poison=poison, topic=topic):
                if err is not None:
                    failures.append(err)
                else:
                    sent.append(Sent(poison, topic, msg.offset()))

            producer.produce(
                kafka.topic(topic),
                poison.value,
                b"poison",
                partition=0,
                headers=list(poison.headers),
                on_delivery=delivered,
            )
        producer.flush(30)
    assert not failures and producer.flush(30) == 0, failures
    return sent


# -- the services -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Running:
    service: Service
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def platform(kafka: KafkaConfig, tmp_path: Path) -> Iterator[tuple[dict[str, str], list[Running]]]:
    """Every service of the manifests as its own `mlbus run` process on this test's topics;
    SIGTERM to each at the end (SIGKILL for any that ignores it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBUS_")} | {
        "MLBUS_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "MLBUS_TOPIC_PREFIX": kafka.topic_prefix,
        "MLBUS_DATA_DIR": str(tmp_path / "data"),
        "MLBUS_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        # The session broker is the embedded one: short group timeouts (docs/broker.md).
        "MLBUS_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "MLBUS_ARCHIVE__FLUSH_SECONDS": "0.5",
        "MLBUS_API__PORT": str(_free_port()),
        "MLBUS_API__HOST": "127.0.0.1",
        "MLBUS_SERVING__PORT": str(_free_port()),
        "MLBUS_SERVING__HOST": "127.0.0.1",
        "MLBUS_STREAMS__METRICS_PORT": str(_free_port()),
        "MLBUS_LOG_LEVEL": "WARNING",
        # Off unless configured: the console transport runs it without an endpoint.
        "MLBUS_OPENLINEAGE__TRANSPORT": "console",
    }
    running: list[Running] = []
    try:
        for s in SERVICES:
            log = tmp_path / f"{s.name}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [MLBUS, "run", s.name],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            running.append(Running(s, process, log))
        yield env, running
    finally:
        for r in running:
            if r.process.poll() is None:
                r.process.send_signal(signal.SIGTERM)
        for r in running:
            try:
                r.process.wait(30)
            except subprocess.TimeoutExpired:
                r.process.kill()
                r.process.wait()


def assert_all_alive(running: list[Running]) -> None:
    for r in running:
        code = r.process.poll()
        assert code is None, f"{r.service.name} exited with {code}:\n{r.tail()}"


def valid_events(kafka: KafkaConfig, event_type: str) -> list[Event]:
    """The events of a topic that decode (the poison does not)."""
    found = []
    for m in read_raw(kafka, kafka.topic(event_type)):
        with contextlib.suppress(InvalidEvent):
            found.append(decode(m.value(), m.headers(), expected_type=event_type))
    return found


def partition_ends(kafka: KafkaConfig, topics: list[str]) -> dict[tuple[str, int], int]:
    """The offset after the last record of each (prefixed topic, partition) holding any."""
    ends: dict[tuple[str, int], int] = {}
    for topic in topics:
        for m in read_raw(kafka, kafka.topic(topic)):
            key = (m.topic(), m.partition())
            ends[key] = max(ends.get(key, 0), m.offset() + 1)
    return ends


def behind(kafka: KafkaConfig, running: list[Running]) -> list[str]:
    """Where a group has not committed past the last record of a topic it consumes."""
    ends = partition_ends(kafka, sorted({t for r in running for t in group_read(r.service)}))
    late = []
    for r in running:
        topics = {kafka.topic(t) for t in group_read(r.service)}
        mine = [TopicPartition(t, p) for t, p in ends if t in topics]
        if not mine:
            continue
        group = r.service.group_id(kafka.topic_prefix)
        consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group})
        try:
            for tp in consumer.committed(mine, timeout=10):
                end = ends[tp.topic, tp.partition]
                if tp.offset < end:
                    late.append(f"{r.service.name}: {tp.topic}[{tp.partition}] {tp.offset}/{end}")
        finally:
            consumer.close()
    return late


def letters_by_origin(kafka: KafkaConfig) -> dict[tuple[str, str, int], list[Event]]:
    """Dead letters by (consumer group, topic without prefix, offset)."""
    found: dict[tuple[str, str, int], list[Event]] = {}
    for letter in dead_letters(kafka):
        o = letter.data.original
        key = (letter.data.consumer_group or "", kafka.event_type(o.topic), o.offset)
        found.setdefault(key, []).append(letter)
    return found


def test_every_poison_record_on_every_consumed_topic_is_dead_lettered_and_nothing_stops(
    kafka: KafkaConfig, platform: tuple[dict[str, str], list[Running]]
) -> None:
    env, running = platform
    sent = send_poison(kafka)
    consumers = [r for r in running if dead_lettering(r.service)]
    expected = {
        (r.service.group_id(kafka.topic_prefix), s.topic, s.offset): s
        for r in consumers
        for s in sent
        if s.topic in group_read(r.service)
    }
    assert len({s.topic for s in sent}) >= 9 and len(expected) >= 72  # what the probe found

    def all_letters() -> dict[tuple[str, str, int], list[Event]] | None:
        letters = letters_by_origin(kafka)
        return letters if expected.keys() <= letters.keys() else None

    def missing() -> str:
        assert_all_alive(running)
        have = letters_by_origin(kafka)
        gone = [
            f"{g} {t}@{o}: {s.poison.kind}"
            for (g, t, o), s in expected.items()
            if (g, t, o) not in have
        ]
        return f"{len(gone)} dead letters, e.g. {gone[:8]}"

    letters = wait_until(all_letters, missing, timeout=150, interval=1.0)
    for key, s in expected.items():
        (letter,) = letters[key]  # exactly one per poison record and group
        data = letter.data
        assert data.error_type == "InvalidEvent", (s.poison.kind, data.reason)
        for fragment in s.poison.reason:
            assert fragment in data.reason, (s.topic, s.poison.kind, data.reason)
        if s.poison.value is not None and len(s.poison.value) < MAX_EVENT_BYTES:
            assert base64.b64decode(data.original.value_b64 or "") == s.poison.value
    # Nothing else was dead-lettered: no group failed on a record it should have taken.
    unexpected = sorted(set(letters) - set(expected))
    assert not unexpected, (
        f"dead-lettered by a group that should not consume them: {unexpected[:8]} (a topic "
        "consumed in the group now, not through a log view? update READ_GROUPLESS)"
    )

    # Every group (dead-lettering or not: lineage, archive) moved past the poison.
    wait_until(lambda: not behind(kafka, running), lambda: str(behind(kafka, running)), 90, 1.0)
    assert_all_alive(running)

    # Valid events afterwards are still processed, by every service.
    sample = subprocess.run(
        [MLBUS, "datasets", "sample", "iris"], env=env, capture_output=True, text=True, timeout=120
    )
    assert sample.returncode == 0, sample.stderr
    refs = publish_valid(kafka)
    wait_until(
        lambda: any(e.data.name == "iris" for e in valid_events(kafka, "dataset.validated")),
        "the validator to validate iris",
        timeout=60,
    )
    wait_until(
        lambda: [
            e
            for e in valid_events(kafka, "deployment.updated")
            if (e.data.model, e.data.version, e.data.status) == ("probe", "1", "failed")
        ],
        "the model server to report the promotion of probe@1 (an artifact that does not exist)",
        timeout=60,
    )
    wait_until(
        lambda: [
            e
            for e in valid_events(kafka, "inference.results")
            if e.data.request_id == "probe-request" and e.data.error
        ],
        "an answer (an error: no such model) to the stream inference request",
        timeout=60,
    )
    wait_until(
        lambda: [
            e
            for t in ("training.started", "training.completed", "training.failed")
            for e in valid_events(kafka, t)
            if e.data.request_id == refs["training.requested"]
        ],
        "the trainer to take the training request",
        timeout=90,
    )
    api = f"http://127.0.0.1:{env['MLBUS_API__PORT']}"
    wait_until(
        lambda: _lists_iris(api), "the API to list the iris dataset", timeout=60, interval=0.5
    )
    wait_until(lambda: not behind(kafka, running), lambda: str(behind(kafka, running)), 90, 1.0)
    assert set(letters_by_origin(kafka)) == set(expected), "a valid event was dead-lettered"
    assert_all_alive(running)
    # And each stops cleanly, as it would have without the poison.
    for r in running:
        r.process.send_signal(signal.SIGTERM)
    for r in running:
        # uvicorn re-raises the SIGTERM after its clean shutdown (the API's exit status)
        code = r.process.wait(60)
        assert code in (0, -signal.SIGTERM), f"{r.service.name} exited {code}:\n{r.tail()}"


def _lists_iris(api: str) -> bool:
    try:
        response = httpx.get(f"{api}/datasets", timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "iris" in response.text


def publish_valid(kafka: KafkaConfig) -> dict[str, str]:
    """A promotion whose artifact does not exist, a stream inference request for a model
    nobody serves and a one-epoch training request on iris; their event ids by type."""
    payloads = [
        ModelPromoted(
            model="probe",
            version="1",
            reason="probe",
            actor="probe",
            artifact=Artifact(
                uri="file:///nowhere/probe/1/model.safetensors",
                sha256=SHA,
                model_card_uri="file:///nowhere/probe/1/model_card.json",
            ),
        ),
        InferenceRequest(
            request_id="probe-request",
            model="nobody-serves-this",
            inputs=[Tensor(name="x", shape=[1, 4], datatype="FP32", data=[0.1, 0.2, 0.3, 0.4])],
        ),
        TrainingRequested(
            model="probe-iris",
            dataset=DatasetRef(name="iris", version=_iris_version(kafka)),
            family="mlp",
            max_epochs=1,
            device="cpu",
        ),
    ]
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    refs: dict[str, str] = {}
    for payload in payloads:
        ref, value = encode_new(payload, source="probe")
        producer.produce(kafka.topic(ref.type), value, ref.key, headers=STRUCTURED_HEADERS)
        refs[ref.type] = ref.id
    assert producer.flush(30) == 0
    return refs


def _iris_version(kafka: KafkaConfig) -> str:
    (created,) = [e for e in valid_events(kafka, "dataset.created") if e.data.name == "iris"]
    return str(created.data.version)
