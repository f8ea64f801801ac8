"""Capture and restore (mlbus/journal/capture.py, restore.py) against real brokers: each test
starts its own, kills it, and restores into a fresh one. What is compared is read back with
a plain confluent-kafka consumer and admin client."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from mlbus.errors import JournalTooNew
from mlbus.journal.capture import Capture
from mlbus.journal.format import (
    GROUPS_FILE,
    Record,
    SegmentWriter,
    encode_batch,
    segments,
    write_json,
)
from mlbus.journal.restore import restore
from mlbus.kafka.config import KafkaConfig
from tests.conftest import OWN_BROKER_PREFIX as PREFIX

pytestmark = pytest.mark.integration


Row = tuple[str, int, int, tuple[int, int], bytes | None, bytes | None, Any]


def everything(kafka: KafkaConfig) -> list[Row]:
    """Every record of every topic of the broker, as the broker serves it."""
    admin = AdminClient(kafka.admin())
    metadata = admin.list_topics(timeout=10)
    partitions = [
        TopicPartition(name, p, 0)
        for name, topic in metadata.topics.items()
        if not name.startswith("__")
        for p in topic.partitions
    ]
    consumer = Consumer(
        kafka.consumer(
            None, **{"enable.partition.eof": True, "isolation.level": "read_uncommitted"}
        )
    )
    consumer.assign(partitions)
    rows: list[Row] = []
    left = len(partitions)
    deadline = time.monotonic() + 60
    while left and time.monotonic() < deadline:
        m = consumer.poll(1.0)
        if m is None:
            continue
        if m.error():
            left -= 1
            continue
        rows.append(
            (m.topic(), m.partition(), m.offset(), m.timestamp(), m.key(), m.value(), m.headers())
        )
    consumer.close()
    assert not left, "the broker did not serve every partition to its end"
    return sorted(rows, key=lambda r: (r[0], r[1], r[2]))


def group_offsets(kafka: KafkaConfig, group: str) -> dict[tuple[str, int], int]:
    admin = AdminClient(kafka.admin())
    future = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[group]
    return {
        (tp.topic, tp.partition): tp.offset for tp in future.result(timeout=10).topic_partitions
    }


def commit(kafka: KafkaConfig, group: str, offsets: dict[tuple[str, int], int]) -> None:
    consumer = Consumer(kafka.consumer(group))
    consumer.commit(
        offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False
    )
    consumer.close()


def test_a_fresh_broker_gets_back_every_record_at_its_offset_and_every_group_offset(
    brokers: Any, tmp_path: Path
) -> None:
    journal = tmp_path / "journal"
    first, kafka = brokers()
    extra = PREFIX + "changelog"  # a topic a service creates itself, with its own configs
    admin = AdminClient(kafka.admin())
    admin.create_topics([NewTopic(extra, 2, 1, config={"cleanup.policy": "compact"})])[
        extra
    ].result()
    capture = Capture(kafka, journal, sync_seconds=0.05, snapshot_seconds=0.2)
    capture.start()
    producer = Producer(kafka.producer())
    topic = kafka.topic("dataset.created")
    for i in range(500):
        producer.produce(
            topic,
            b"value-%d" % i,
            b"key-%d" % (i % 7),
            timestamp=1_700_000_000_000 + i,
            headers=[("ce_id", b"%d" % i), ("ce_id", b"again"), ("none", None), ("empty", b"")],
        )
    producer.produce(kafka.topic("model.promoted"), None, None, partition=2)
    producer.produce(kafka.topic("model.promoted"), b"", b"", partition=2)
    producer.produce(extra, b"state", b"k", partition=1)
    producer.flush(30)
    # A transaction's commit marker takes an offset: a restore must skip it too.
    transactional = Producer(kafka.common() | {"transactional.id": "test-tx"})
    transactional.init_transactions(30)
    transactional.begin_transaction()
    for value in (b"t1", b"t2"):
        transactional.produce(kafka.topic("pipeline.defined"), value, b"p", partition=0)
    transactional.commit_transaction(30)
    producer.produce(kafka.topic("pipeline.defined"), b"after", b"p", partition=0)
    producer.flush(30)
    commit(
        kafka, "group-a", {(topic, 0): 3, (topic, 2): 1, (kafka.topic("pipeline.defined"), 0): 4}
    )
    commit(kafka, "group-b", {(extra, 1): 1})
    time.sleep(0.5)  # a snapshot of the groups after their commits
    capture.stop()  # what the broker has is written and synced
    assert capture.error is None
    before = everything(kafka)
    assert [r[2] for r in before if r[0] == kafka.topic("pipeline.defined")] == [0, 1, 3]
    offsets_a, offsets_b = group_offsets(kafka, "group-a"), group_offsets(kafka, "group-b")
    first.stop()

    _, fresh = brokers()
    restored = restore(fresh, journal)
    assert everything(fresh) == before
    assert group_offsets(fresh, "group-a") == offsets_a
    assert group_offsets(fresh, "group-b") == offsets_b
    assert (restored.records, restored.gaps, restored.clamped) == (len(before), 1, [])
    assert restored.positions[kafka.topic("pipeline.defined")] == {0: 4}
    resource = ConfigResource(ConfigResource.Type.TOPIC, extra)
    fresh_admin = AdminClient(fresh.admin())
    configs = fresh_admin.describe_configs([resource])[resource].result()
    assert configs["cleanup.policy"].value == "compact"

    # Capture resumes where the journal ends: a new segment with the new records only.
    resumed = Capture(fresh, journal, positions=restored.positions, sync_seconds=0.05)
    resumed.start()
    late = Producer(fresh.producer())
    late.produce(extra, b"new", b"k", partition=1)
    late.flush(30)
    time.sleep(0.5)
    resumed.stop()
    assert len(segments(journal)) == 2
    _, again = brokers()
    restore(again, journal)
    assert [(r[2], r[5]) for r in everything(again) if r[0] == extra] == [
        (0, b"state"),
        (1, b"new"),
    ]


def journal_of(directory: Path, topic: str, counts: dict[int, int], size: int = 100) -> None:
    writer = SegmentWriter(directory)
    value = b"v" * size
    for partition, count in counts.items():
        for start in range(0, count, 5000):
            records = [
                Record(o, 1_700_000_000_000 + o, 1, b"k%d" % o, value, [("h", b"x")])
                for o in range(start, min(count, start + 5000))
            ]
            writer.write(encode_batch(topic, partition, records))
    writer.close()


def test_a_group_offset_past_the_journal_end_is_set_back_to_it(
    brokers: Any, tmp_path: Path
) -> None:
    _, kafka = brokers()
    topic = kafka.topic("dataset.created")
    journal_of(tmp_path, topic, {0: 10})
    write_json(tmp_path / GROUPS_FILE, {"format": 1, "groups": {"g": {topic: {"0": 50, "1": 0}}}})
    restored = restore(kafka, tmp_path)
    assert group_offsets(kafka, "g") == {(topic, 0): 10, (topic, 1): 0}
    assert restored.clamped == [f"g {topic}[0] 50→10"]


def test_a_torn_final_write_restores_everything_before_it(brokers: Any, tmp_path: Path) -> None:
    _, kafka = brokers()
    topic = kafka.topic("dataset.created")
    journal_of(tmp_path, topic, {0: 7000})  # two frames: 0-4999, 5000-6999
    (segment,) = segments(tmp_path)
    data = segment.read_bytes()
    segment.write_bytes(data[:-10])
    restored = restore(kafka, tmp_path)
    assert len(restored.scan.torn) == 1
    assert restored.records == 5000 and restored.positions == {topic: {0: 5000}}
    rows = everything(replace(kafka))
    assert [r[2] for r in rows if r[0] == topic] == list(range(5000))
    assert segment.read_bytes() == data[:-10], "the torn segment is left as it is"


def test_a_newer_journal_is_refused_and_the_broker_gets_nothing(
    brokers: Any, tmp_path: Path
) -> None:
    _, kafka = brokers()
    topic = kafka.topic("dataset.created")
    journal_of(tmp_path, topic, {0: 3})
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[8] = 9  # the format version
    segment.write_bytes(bytes(data))
    with pytest.raises(JournalTooNew):
        restore(kafka, tmp_path)
    assert everything(kafka) == []
    assert segment.read_bytes() == bytes(data)


def test_a_million_record_journal_is_restored_to_the_same_offsets(
    brokers: Any, tmp_path: Path
) -> None:
    _, kafka = brokers()
    topic = kafka.topic("inference.logged")
    counts = {p: 1_000_000 // 6 + (1 if p < 1_000_000 % 6 else 0) for p in range(6)}
    journal_of(tmp_path, topic, counts)
    restored = restore(kafka, tmp_path)
    print(
        f"restored {restored.records:,} records in {restored.seconds:.1f}s: {restored.rate:,.0f}/s"
    )
    assert restored.records == 1_000_000
    assert restored.positions == {topic: counts}
    consumer = Consumer(kafka.consumer(None, **{"enable.partition.eof": True}))
    consumer.assign([TopicPartition(topic, p, n - 1) for p, n in counts.items()])
    last: dict[int, tuple[int, bytes | None]] = {}
    while len(last) < len(counts):
        m = consumer.poll(10)
        assert m is not None, "the broker did not serve the partitions' last records"
        if not m.error():
            last[m.partition()] = (m.offset(), m.key())
    consumer.close()
    assert last == {p: (n - 1, b"k%d" % (n - 1)) for p, n in counts.items()}
