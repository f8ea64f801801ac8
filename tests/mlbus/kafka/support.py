"""Helpers for the bus runtime's integration tests: payload factories, deadline waits, plain
(non-mlbus) Kafka clients, a consumer loop run in a thread, and consumer scripts run as
separate processes (for SIGTERM and SIGKILL)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from mlbus.kafka.config import MAX_RECORD_BYTES, KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, LoopStats, Record
from mlbus.kafka.reader import TopicReader
from mlbus.schemas.base import Payload
from mlbus.schemas.catalog import DEADLETTER
from mlbus.schemas.codec import STRUCTURED_HEADERS, EventRef, decode, encode_new
from mlbus.schemas.datasets import ColumnSchema, DatasetCreated
from mlbus.schemas.envelope import Event
from mlbus.schemas.training import TrainingProgress, TrainingRequested

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[3]
SHA = "sha256:" + "ab" * 32
DEADLINE = 30.0


# -- payloads -----------------------------------------------------------------------------


def dataset(**changes: Any) -> DatasetCreated:
    fields = dict(
        name="digits",
        version="v1",
        uri="file:///tmp/digits.parquet",
        content_hash=SHA,
        arrow_schema=[ColumnSchema(name="x", type="double")],
        num_rows=10,
        num_bytes=100,
    )
    return DatasetCreated(**(fields | changes))


def progress(**changes: Any) -> TrainingProgress:
    fields = dict(
        run_id="r1",
        model="digits",
        epoch=1,
        max_epochs=3,
        metrics={"loss": 0.5},
        samples_per_second=100.0,
    )
    return TrainingProgress(**(fields | changes))


def requested(**changes: Any) -> TrainingRequested:
    fields = dict(model="digits", dataset={"name": "digits", "version": "v1"}, family="mlp")
    return TrainingRequested.model_validate(fields | changes)


# -- waiting ------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T],
    what: str | Callable[[], str],
    timeout: float = DEADLINE,
    interval: float = 0.05,
) -> T:
    """Poll `condition` until it returns something truthy (returned); fail after `timeout`
    seconds saying `what` was awaited (a callable is asked only then, to show the state)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(
                f"gave up after {timeout:.0f}s waiting for {what() if callable(what) else what}"
            )
        time.sleep(interval)


# -- plain Kafka clients (no mlbus in the path) -------------------------------------------


@dataclass(frozen=True)
class Produced:
    topic: str
    partition: int
    offset: int


def produce_raw(
    kafka: KafkaConfig,
    topic: str,
    value: bytes | str | None,
    *,
    key: bytes | str | None = None,
    headers: Sequence[tuple[str, bytes]] | None = None,
    **conf: Any,
) -> Produced:
    """Produce one record with a plain confluent-kafka Producer; return where it landed."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap, **conf})
    reports: list[tuple[KafkaError | None, Message]] = []
    producer.produce(
        topic,
        value,
        key,
        headers=list(headers or []),
        on_delivery=lambda err, msg: reports.append((err, msg)),
    )
    remaining = producer.flush(DEADLINE)
    assert remaining == 0 and len(reports) == 1, f"record to {topic} not confirmed"
    error, message = reports[0]
    assert error is None, f"producing to {topic} failed: {error}"
    return Produced(message.topic(), message.partition(), message.offset())


def publish(
    kafka: KafkaConfig, payloads: Sequence[Payload], *, key: bytes | str | None = None
) -> list[EventRef]:
    """Publish events as mlbus encodes them, through a plain (non-idempotent) producer: the
    consumer tests need events on topics fast, not the EventProducer (tested on its own)."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 1})
    refs, failures = [], []
    for payload in payloads:
        ref, value = encode_new(payload, source="test/publish")
        producer.produce(
            kafka.topic(ref.type),
            value,
            key if key is not None else ref.key,
            headers=STRUCTURED_HEADERS,
            on_delivery=lambda err, msg: failures.append(err) if err else None,
        )
        refs.append(ref)
    assert producer.flush(DEADLINE) == 0 and not failures, f"not delivered: {failures}"
    return refs


def read_raw(kafka: KafkaConfig, topic: str, timeout: float = DEADLINE) -> list[Message]:
    """Every record of `topic`, read with a plain confluent-kafka Consumer (no group)."""
    consumer = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "group.id": "plain-reader-never-commits",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        remaining, out = set(partitions), []
        deadline = time.monotonic() + timeout
        while remaining:
            assert time.monotonic() < deadline, f"{topic}: partitions {remaining} never reached"
            message = consumer.poll(0.2)
            if message is None:
                continue
            if message.error() is not None:
                assert message.error().code() == KafkaError._PARTITION_EOF, message.error()
                remaining.discard(message.partition())
                continue
            out.append(message)
        return out
    finally:
        consumer.close()


def committed_offset(kafka: KafkaConfig, group: str, topic: str, partition: int) -> int | None:
    """The offset `group` committed for a partition (None if nothing), read with a plain
    consumer that joins nothing."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group})
    try:
        [tp] = consumer.committed([TopicPartition(topic, partition)], timeout=10)
        return tp.offset if tp.offset >= 0 else None
    finally:
        consumer.close()


# -- reading what mlbus wrote -------------------------------------------------------------


def read_events(kafka: KafkaConfig, event_type: str) -> list[Event]:
    """Every record of the topic of `event_type`, decoded (they must all be valid)."""
    return [
        decode(m.value(), m.headers(), expected_type=event_type, max_bytes=4 * MAX_RECORD_BYTES)
        for m in TopicReader(kafka, [kafka.topic(event_type)], start="beginning")
    ]


def dead_letters(kafka: KafkaConfig) -> list[Event]:
    return read_events(kafka, DEADLETTER)


# -- a consumer loop in a thread ----------------------------------------------------------


@dataclass
class Recorder:
    """A handler that records what it handled, thread-safe; `fail` may raise for an event."""

    fail: Callable[[Event, int], None] | None = None
    events: list[Event] = field(default_factory=list)
    records: list[tuple[str, int, int]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, event: Event, record: Record) -> None:
        with self._lock:
            self.calls[event.id] = attempt = self.calls.get(event.id, 0) + 1
        if self.fail is not None:
            self.fail(event, attempt)
        with self._lock:
            self.events.append(event)
            self.records.append((record.topic, record.partition, record.offset))

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [e.id for e in self.events]


class LoopThread:
    """Runs `loop.run(**kwargs)` in a thread; the context exit stops it and re-raises."""

    def __init__(self, loop: ConsumerLoop, **run_kwargs: Any) -> None:
        self.loop = loop
        self.stats: LoopStats | None = None
        self.error: BaseException | None = None
        self._kwargs = {"install_signal_handlers": False} | run_kwargs
        self._thread = threading.Thread(target=self._run, name="consumer-loop", daemon=True)

    def _run(self) -> None:
        try:
            self.stats = self.loop.run(**self._kwargs)
        except BaseException as e:
            self.error = e

    def start(self) -> LoopThread:
        self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = DEADLINE) -> LoopStats:
        """Wait for the loop to end by itself; stop it and fail if it does not."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.loop.stop()
            self._thread.join(DEADLINE)
            pytest.fail(f"the consumer loop did not end within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        assert self.stats is not None
        return self.stats

    def stop(self) -> LoopStats:
        self.loop.stop()
        return self.join()

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.stop()
        else:  # do not hide the test's own failure
            self.loop.stop()
            self._thread.join(DEADLINE)


def run_to_end(loop: ConsumerLoop, timeout: float = DEADLINE, **kwargs: Any) -> LoopStats:
    """Run `loop` until every assigned partition is read to its end."""
    return LoopThread(loop, stop_at_end=True, **kwargs).start().join(timeout)


# -- consumers in their own process ---------------------------------------------------------


def kafka_arg(kafka: KafkaConfig) -> str:
    """The connection as one JSON argument for a consumer script (`KafkaConfig(**json)`)."""
    return json.dumps(asdict(kafka) | {"extra": kafka.options()})


_runs = itertools.count(1)


class Script:
    """A Python script run with this interpreter and the repository on PYTHONPATH; its output
    goes to a log file shown in failure messages. Killed at teardown if still running."""

    def __init__(self, path: Path, args: Sequence[str], env: Mapping[str, str] | None = None):
        self.path = path
        self.log_path = path.with_suffix(f".{next(_runs)}.log")
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.process = subprocess.Popen(
            [sys.executable, str(path), *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": python_path, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.path.name} did not exit within {timeout:.0f}s; log:\n{self.log()}")
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def lines(path: Path) -> list[str]:
    """Complete lines of a file another process appends to (a partial last line is left)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


class Producing:
    """Publishes `make(i)` payloads, `per_batch` at a time (i counts every payload sent), in
    a thread until the `with` block ends: a log that keeps growing under a test."""

    def __init__(
        self,
        kafka: KafkaConfig,
        make: Callable[[int], Payload],
        *,
        per_batch: int = 20,
        pause: float = 0.02,
    ) -> None:
        self.kafka, self.make, self.per_batch, self.pause = kafka, make, per_batch, pause
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            publish(self.kafka, [self.make(self.sent + i) for i in range(self.per_batch)])
            self.sent += self.per_batch
            time.sleep(self.pause)

    def __enter__(self) -> Producing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


# -- new logs -----------------------------------------------------------------------------


def new_log(kafka: KafkaConfig) -> KafkaConfig:
    """`kafka` on a new log: every catalog topic again, empty, under a fresh prefix. What a
    store keyed by contract topic sees after its topics were recreated or its broker
    restarted empty (stores key positions by the contract's name, not the prefix)."""
    from dataclasses import replace

    from mlbus.kafka.admin import apply_topics

    fresh = replace(kafka, topic_prefix=f"t{os.urandom(5).hex()}.")
    apply_topics(fresh)
    return fresh


def copy_log(kafka: KafkaConfig, to: KafkaConfig, topics: Sequence[str]) -> int:
    """Every record of `topics` re-produced into `to` as it was: same partition, key, value,
    headers and CreateTime, in order, so each lands at its old offset (a byte-identical
    restore of the log). Returns the number of records copied."""
    from mlbus.kafka.reader import read_log

    producer = Producer(
        {"bootstrap.servers": to.bootstrap, "linger.ms": 5, "enable.idempotence": True}
    )
    failures: list[KafkaError] = []
    copied = 0
    for record in read_log(kafka, topics):
        producer.produce(
            to.topic(record.topic),
            record.value,
            record.key,
            partition=record.partition,
            headers=list(record.headers),
            timestamp=record.timestamp_ms or 0,
            on_delivery=lambda err, msg: failures.append(err) if err else None,
        )
        copied += 1
    assert producer.flush(DEADLINE) == 0 and not failures, f"not delivered: {failures}"
    return copied


def recreate_topics(kafka: KafkaConfig, topics: Sequence[str]) -> None:
    """Delete `topics` and create them again, empty (the other way to a new log)."""
    from confluent_kafka.admin import AdminClient

    from mlbus.kafka.admin import apply_topics

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for future in admin.delete_topics([kafka.topic(t) for t in topics]).values():
        future.result(DEADLINE)
    wait_until(
        lambda: not set(map(kafka.topic, topics)) & set(admin.list_topics(timeout=10).topics),
        "the topics to be gone",
    )
    apply_topics(kafka)
