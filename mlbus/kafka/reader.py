"""Group-less reading of whole topics as raw records (`mlbus tail`, `mlbus deadletters`,
audits, archive restores): assigns every partition directly, so it joins no consumer group and
changes nobody's offsets. State kept from topics as typed events is a log view
(mlbus/kafka/logview.py).

`since_ms` starts at a time: on a real cluster `offsets_for_times` finds the first offsets
(production path); the embedded broker answers 0 for every time (docs/broker.md), so
there the reader starts at the beginning. Either way, records older than `since_ms` are
skipped, so the answer is right on both (CreateTime is not monotonic within a partition,
so the hint is only a hint).

The end of a partition is detected with `enable.partition.eof` (the fetch response's
high-water mark), which is right on Apache Kafka and on the embedded broker alike. Starting
"at the end" uses the list-offsets high-water mark on a real cluster (production path) and,
on the embedded broker whose list-offsets answer is wrong (docs/broker.md), reads to the
end without yielding (correct on both, slower on long topics).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from mlbus.errors import TransientError, UnknownTopic
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Consumed, next_batch


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One record of the log as stored, whatever it is read from (Kafka or the archive):
    what replays, rebuilds, audits and restores work on. `topic` is the contract's name
    (without the deployment's topic prefix), so an archive restores into any cluster."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    value: bytes | None

    @classmethod
    def from_message(cls, message: Consumed, kafka: KafkaConfig) -> LogRecord:
        kind, ts = message.timestamp()
        return cls(
            topic=kafka.event_type(message.topic()),
            partition=message.partition(),
            offset=message.offset(),
            timestamp_ms=ts if kind else None,
            key=message.key(),
            headers=tuple(message.headers() or ()),
            value=message.value(),
        )


class TopicReader:
    def __init__(
        self,
        kafka: KafkaConfig,
        topics: Sequence[str],
        *,
        start: Literal["beginning", "end"] = "beginning",
        follow: bool = False,
        poll_timeout: float = 0.2,
        since_ms: int | None = None,
    ) -> None:
        self.kafka = kafka
        self.topics = list(topics)
        self.start = start
        self.since_ms = since_ms
        self.follow = follow
        self.poll_timeout = poll_timeout
        self._stop = threading.Event()
        #: Set once every partition has been read to its end (what "now" was at the start).
        self.caught_up = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def __iter__(self) -> Iterator[Consumed]:
        eof = {"enable.partition.eof": True}
        # A read to the end sees each end a fetch wait after its last record: a short one
        # unless it follows (and then polls while idle).
        conf = self.kafka.consumer(None, **eof) if self.follow else self.kafka.lookup(**eof)
        consumer = Consumer(conf)
        try:
            partitions = all_partitions(consumer, self.kafka, self.topics)
            skipping: set[tuple[str, int]] = set()
            if self.start == "end" and not self.kafka.embedded:
                for tp in partitions:
                    _, high = consumer.get_watermark_offsets(tp, timeout=10)
                    tp.offset = high
            elif self.start == "end":
                skipping = {(tp.topic, tp.partition) for tp in partitions}
            elif self.since_ms is not None and not self.kafka.embedded:
                for tp in partitions:
                    tp.offset = self.since_ms
                found = consumer.offsets_for_times(partitions, timeout=10)
                # -1: no record at or after that time in the partition
                for tp in found:
                    tp.offset = OFFSET_END if tp.offset < 0 else tp.offset
                partitions = found
            consumer.assign(partitions)
            remaining = {(tp.topic, tp.partition) for tp in partitions}
            if not remaining:
                self.caught_up.set()
            while not self._stop.is_set() and (remaining or self.follow):
                for message in next_batch(consumer, 500, self.poll_timeout):
                    error = message.error()
                    key = (message.topic(), message.partition())
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            remaining.discard(key)
                            skipping.discard(key)
                            if not remaining:
                                self.caught_up.set()
                        elif error.fatal():
                            raise TransientError(f"reading {key[0]}: {error.str()}")
                        continue
                    if key in skipping:
                        continue
                    if self.since_ms is not None:
                        kind, ts = message.timestamp()
                        if kind and ts < self.since_ms:
                            continue
                    yield message
                    if self._stop.is_set():
                        return
        finally:
            consumer.close()


def all_partitions(
    consumer: Consumer, kafka: KafkaConfig, topics: Sequence[str]
) -> list[TopicPartition]:
    """Every partition of `topics` (full names, prefix included), each at the beginning;
    `UnknownTopic` for a topic that does not exist, `TransientError` if Kafka is away."""
    try:
        metadata = consumer.list_topics(timeout=10)
    except KafkaException as e:
        raise TransientError(
            f"cannot reach Kafka at {kafka.bootstrap}: {e.args[0].str()}"
        ) from None
    partitions = []
    for topic in topics:
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            raise UnknownTopic(f"topic {topic!r} does not exist (run `mlbus topics apply`)")
        partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(found.partitions)]
    return partitions


def read_log(
    kafka: KafkaConfig,
    topics: Sequence[str],
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Iterator[LogRecord]:
    """Every record of the contract `topics` (names without prefix) from `since_ms` (or the
    beginning) to the end of each partition as it was when reading started, raw and in
    order within each partition; joins no group, commits nothing."""
    names = [kafka.topic(t) for t in topics]
    for message in TopicReader(kafka, names, since_ms=since_ms):
        if until_ms is not None:
            kind, ts = message.timestamp()
            if kind and ts > until_ms:
                continue
        yield LogRecord.from_message(message, kafka)
