"""Restore: the journal replayed into a fresh embedded broker before any service starts —
every topic created, every record re-produced into its partition in offset order (so each
lands at the offset it had), then every consumer group's committed offsets set again.

Writes every journaled topic; reads nothing from the broker but delivery reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from mlbus.errors import JournalError
from mlbus.journal.capture import Positions
from mlbus.journal.format import (
    GROUPS_FILE,
    TOPICS_FILE,
    Batch,
    Record,
    Scan,
    read_journal,
    read_json,
)
from mlbus.journal.retention import advance, read_starts
from mlbus.kafka.config import KafkaConfig


@dataclass
class Restored:
    records: int = 0
    topics: int = 0
    groups: int = 0
    seconds: float = 0.0
    scan: Scan = field(default_factory=Scan)
    positions: Positions = field(default_factory=dict)
    """topic → partition → next offset: where capture resumes"""
    gaps: int = 0
    """offsets the journal skips (transaction markers), re-created with transactions"""
    clamped: list[str] = field(default_factory=list)
    """group offsets past the journal's end (its lost tail), set back to that end"""

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


_PRODUCERS = 4

Run = tuple[Batch, int, int]
"""records i..j-1 of a batch"""


class _Replay:
    """Produces records in order; a record landing at any offset but its own fails the
    restore."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.kafka = kafka
        self.errors: list[str] = []
        # Partitions are spread over a few producers (connections): with one request in
        # flight per connection, a single one would wait on every round trip.
        self.producers = [Producer(self._conf()) for _ in range(_PRODUCERS)]

    def producer(self, topic: str, partition: int) -> Producer:
        return self.producers[hash((topic, partition)) % len(self.producers)]

    def _conf(self, **extra: Any) -> dict[str, Any]:
        return (
            self.kafka.common()
            | {
                # Not idempotent: the embedded broker takes a third of the records per second
                # from an idempotent producer. One request in flight keeps each partition's
                # order through retries; a retry that duplicates a record (a lost response)
                # moves every later offset, which the check on each run's last record catches.
                "enable.idempotence": False,
                "max.in.flight.requests.per.connection": 1,
                "acks": "all",
                "linger.ms": 20,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "queue.buffering.max.kbytes": 1_048_576,
                "message.max.bytes": 64 * 1024 * 1024,
                "compression.type": "none",  # loopback: compressing costs more than it saves
                "delivery.report.only.error": True,
                "on_delivery": self._delivered,
            }
            | extra
        )

    def _delivered(self, error: KafkaError | None, message: Any) -> None:
        if error is not None:
            self.errors.append(f"{message.topic()}[{message.partition()}]: {error.str()}")

    def _landed(self, expected: int) -> Any:
        """A delivery report checking that a record landed at `expected`."""

        def check(error: KafkaError | None, message: Any) -> None:
            if error is None and message.offset() != expected:
                self.errors.append(
                    f"{message.topic()}[{message.partition()}]: offset {expected} landed at "
                    f"{message.offset()}"
                )
            self._delivered(error, message)

        return check

    def produce(self, producer: Producer, topic: str, partition: int, r: Record) -> None:
        while True:
            try:
                producer.produce(
                    topic,
                    r.value,
                    r.key,
                    partition=partition,
                    timestamp=r.timestamp if r.timestamp > 0 else 0,
                    headers=r.headers,
                    on_delivery=self._landed(r.offset),
                )
                return
            except BufferError:
                producer.poll(0.05)

    def produce_run(self, run: Run) -> None:
        """The hot path: a slice of a batch, one `produce` call per record; the last one's
        offset is checked (an earlier one out of place moves it too)."""
        batch, i, j = run
        if j - i > 1:
            self._produce_slice(batch, i, j - 1)
        r = Record(
            batch.offsets[j - 1],
            batch.timestamps[j - 1],
            batch.timestamp_types[j - 1],
            batch.keys[j - 1],
            batch.values[j - 1],
            batch.headers[j - 1],
        )
        self.produce(self.producer(batch.topic, batch.partition), batch.topic, batch.partition, r)

    def _produce_slice(self, batch: Batch, i: int, j: int) -> None:
        topic, partition = batch.topic, batch.partition
        producer = self.producer(topic, partition)
        produce = producer.produce
        for value, key, ts, headers in zip(
            batch.values[i:j],
            batch.keys[i:j],
            batch.timestamps[i:j],
            batch.headers[i:j],
            strict=True,
        ):
            while True:
                try:
                    produce(
                        topic,
                        value,
                        key,
                        partition=partition,
                        timestamp=ts if ts > 0 else 0,  # 0: none (librdkafka sets now)
                        headers=headers,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)

    def flush(self) -> None:
        if sum(producer.flush(60.0) for producer in self.producers):
            raise JournalError("restore: the broker did not take every record within 60s")
        if self.errors:
            raise JournalError(
                f"restore: {len(self.errors)} record(s) refused or misplaced: {self.errors[0]}. "
                "The journal is left untouched; start again"
            )

    def emit(self, runs: list[Run], skipped: int) -> None:
        """Produce consecutive records (slices of batches) followed by `skipped` offsets. A
        skipped offset held a transaction marker: the last `skipped` records go out as that
        many transactions, committed in turn, so a marker lands after them again."""
        if not skipped:
            for run in runs:
                self.produce_run(run)
            return
        records = [r for batch, i, j in runs for r in batch.records[i:j]]
        topic, partition = runs[-1][0].topic, runs[-1][0].partition
        if skipped > len(records):
            raise JournalError(
                f"restore: {topic}[{partition}] skips {skipped} offsets after offset "
                f"{records[-1].offset if records else -1}; only transaction markers can be "
                "re-created, and not this many here. The journal is left untouched"
            )
        for r in records[:-skipped]:
            self.produce(self.producer(topic, partition), topic, partition, r)
        self.flush()
        producers = []
        for n in range(skipped):
            producer = Producer(
                self._conf(
                    **{
                        "transactional.id": f"mlbus-restore-{n}",
                        "enable.idempotence": True,  # transactions require it
                        "max.in.flight.requests.per.connection": 5,
                    }
                )
            )
            producer.init_transactions(30.0)
            producer.begin_transaction()
            producers.append(producer)
        for producer, record in zip(producers, records[-skipped:], strict=True):
            self.produce(producer, topic, partition, record)
            producer.flush(30.0)
        for producer in producers:
            producer.commit_transaction(30.0)
        for producer in producers:
            producer.flush(30.0)


def restore(kafka: KafkaConfig, directory: Path) -> Restored:
    """Replay the journal of `directory` into the (fresh, empty) broker of `kafka`."""
    started = time.monotonic()
    out = Restored()
    topics: dict[str, Any] = read_json(directory / TOPICS_FILE).get("topics", {})
    groups: dict[str, Any] = read_json(directory / GROUPS_FILE).get("groups", {})
    _create_topics(kafka, topics)
    out.topics = len(topics)
    replay = _Replay(kafka)
    nexts: Positions = out.positions
    # Partitions whose older records retention dropped (retention.py) start where their kept
    # records do: the broker's partition is moved there first.
    starts = read_starts(directory)
    advance(kafka.bootstrap, starts)
    for topic, by_partition in starts.items():
        nexts.setdefault(topic, {}).update(by_partition)
    # Each partition's last run of records is held back until the next batch shows whether
    # offsets are skipped after it: the records before a skip go out in transactions.
    held: dict[tuple[str, int], list[Run]] = {}
    for batch in read_journal(directory, out.scan):
        key = (batch.topic, batch.partition)
        expected = nexts.setdefault(batch.topic, {}).get(batch.partition, 0)
        offsets = batch.offsets
        i = 0
        while i < len(offsets) and offsets[i] < expected:  # re-read after a crash
            i += 1
        if i == len(offsets):
            continue
        runs = held.pop(key, [])
        if not runs and offsets[i] != expected:
            raise JournalError(
                f"restore: {batch.topic}[{batch.partition}] starts at offset "
                f"{offsets[i]}, not {expected}; the journal is left untouched"
            )
        if offsets[i] != expected:
            out.gaps += offsets[i] - expected
            replay.emit(runs, offsets[i] - expected)
            runs = []
        if offsets[-1] - offsets[i] == len(offsets) - 1 - i:  # no offset skipped inside
            runs.append((batch, i, len(offsets)))
        else:
            start = i
            for j in range(i + 1, len(offsets)):
                if offsets[j] != offsets[j - 1] + 1:
                    runs.append((batch, start, j))
                    out.gaps += offsets[j] - offsets[j - 1] - 1
                    replay.emit(runs, offsets[j] - offsets[j - 1] - 1)
                    runs, start = [], j
            runs.append((batch, start, len(offsets)))
        if len(runs) > 1:  # only the last run can be followed by a skip
            replay.emit(runs[:-1], 0)
            runs = runs[-1:]
        held[key] = runs
        nexts[batch.topic][batch.partition] = offsets[-1] + 1
    for runs in held.values():
        replay.emit(runs, 0)
    replay.flush()
    out.records = out.scan.records
    out.groups, out.clamped = _restore_groups(kafka, groups, nexts)
    out.seconds = time.monotonic() - started
    return out


def _create_topics(kafka: KafkaConfig, topics: dict[str, Any]) -> None:
    """Every journaled topic the broker lacks, with its partitions and configs."""
    admin = AdminClient(kafka.admin())
    existing = admin.list_topics(timeout=10.0).topics
    missing = [
        NewTopic(name, int(spec["partitions"]), 1, config=dict(spec.get("configs") or {}))
        for name, spec in topics.items()
        if name not in existing
    ]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=30).items():
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise JournalError(
                    f"restore: cannot create topic {name}: {e.args[0].str()}"
                ) from None


def _restore_groups(
    kafka: KafkaConfig, groups: dict[str, Any], ends: Positions
) -> tuple[int, list[str]]:
    """Commit each group's journaled offsets on its behalf (the groups are empty: no member
    runs yet). An offset past the restored end (the journal lost a tail the group had read)
    is set to that end, so the group reads what is produced next rather than resetting."""
    admin = AdminClient(kafka.admin())
    clamped: list[str] = []
    restored = 0
    for group, offsets in sorted(groups.items()):
        partitions = []
        for topic, by_partition in offsets.items():
            for partition, offset in by_partition.items():
                end = ends.get(topic, {}).get(int(partition), 0)
                if offset > end:
                    clamped.append(f"{group} {topic}[{partition}] {offset}→{end}")
                    offset = end
                partitions.append(TopicPartition(topic, int(partition), int(offset)))
        if not partitions:
            continue
        request = [ConsumerGroupTopicPartitions(group, partitions)]
        try:
            admin.alter_consumer_group_offsets(request)[group].result(timeout=30.0)
        except KafkaException as e:
            raise JournalError(
                f"restore: cannot set the offsets of group {group}: {e.args[0].str()}"
            ) from None
        restored += 1
    return restored, clamped
