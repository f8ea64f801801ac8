"""Retention of the embedded log (mlbus/journal/retention.py, keeper.py): a trimmed journal
restores every kept record at its offset, with the expired prefix gone and `forever` topics
whole; and under a steady stream of `inference.logged` records with a short retention, the
broker's resident memory stays bounded while the records keep their offsets."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from mlbus.broker import resident_bytes
from mlbus.journal.format import TOPICS_FILE, Record, SegmentWriter, encode_batch, segments
from mlbus.journal.format import write_json as write_side
from mlbus.journal.keeper import Keeper
from mlbus.journal.restore import restore
from mlbus.journal.retention import STARTS_FILE, read_starts, trim
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings

pytestmark = pytest.mark.integration

NOW = 1_800_000_000_000
HOUR = 3_600_000


def journal(directory: Path, topics: dict[str, tuple[int, dict[str, str]]], rows: Any) -> None:
    """A journal of `rows` (topic, partition, offset, timestamp), topics with their configs."""
    directory.mkdir(parents=True, exist_ok=True)
    write_side(
        directory / TOPICS_FILE,
        {
            "format": 1,
            "topics": {n: {"partitions": p, "configs": c} for n, (p, c) in topics.items()},
        },
    )
    writer = SegmentWriter(directory)
    by_partition: dict[tuple[str, int], list[Record]] = {}
    for topic, partition, offset, ts in rows:
        by_partition.setdefault((topic, partition), []).append(
            Record(offset, ts, 0, b"k%d" % offset, b"v%d" % offset, [("h", b"x")])
        )
    for (topic, partition), records in by_partition.items():
        for i in range(0, len(records), 7):  # several batches a partition
            writer.write(encode_batch(topic, partition, records[i : i + 7]))
    writer.close()


def read(kafka: KafkaConfig, topic: str, partition: int) -> list[tuple[int, bytes | None]]:
    consumer = Consumer(kafka.consumer(None, **{"enable.partition.eof": True}))
    consumer.assign([TopicPartition(topic, partition, 0)])
    out = []
    try:
        while (m := consumer.poll(10)) is not None and not m.error():
            out.append((m.offset(), m.value()))
    finally:
        consumer.close()
    return out


def test_a_trimmed_journal_restores_kept_records_at_their_offsets(
    brokers: Any, tmp_path: Path
) -> None:
    directory = tmp_path / "journal"
    short = {"retention.ms": str(HOUR), "cleanup.policy": "delete"}
    rows = [("logged", 0, o, NOW - 2 * HOUR + o) for o in range(50)]  # all expired
    rows += [("logged", 1, o, NOW - 2 * HOUR if o < 30 else NOW - 1000) for o in range(40)]
    rows += [("kept", 0, o, NOW - 100 * HOUR) for o in range(20)]  # forever: all stay
    rows += [("compacted", 0, o, NOW - 100 * HOUR) for o in range(5)]
    journal(
        directory,
        {
            "logged": (2, short),
            "kept": (1, {"retention.ms": "-1"}),
            "compacted": (1, {"retention.ms": "1", "cleanup.policy": "compact"}),
        },
        rows,
    )
    trimmed = trim(directory, now_ms=NOW)
    assert (trimmed.records, trimmed.kept) == (80, 35)
    assert read_starts(directory) == {"logged": {0: 50, 1: 30}}
    assert len(segments(directory)) == 1

    _, kafka = brokers()
    restored = restore(kafka, directory)
    assert read(kafka, "logged", 1) == [(o, b"v%d" % o) for o in range(30, 40)]
    assert read(kafka, "logged", 0) == []
    assert read(kafka, "kept", 0) == [(o, b"v%d" % o) for o in range(20)]
    assert len(read(kafka, "compacted", 0)) == 5
    assert restored.positions["logged"] == {0: 50, 1: 40}
    # New records continue the offsets, in the emptied partition too.
    producer = Producer(kafka.producer())
    producer.produce("logged", b"new", partition=0)
    producer.produce("logged", b"new", partition=1)
    assert producer.flush(10) == 0
    assert read(kafka, "logged", 0) == [(50, b"new")]
    assert read(kafka, "logged", 1)[-1] == (40, b"new")

    # Trimming again drops nothing more; a crash that left old segments beside the trimmed
    # one (starts.json written first) restores the same log.
    assert trim(directory, now_ms=NOW).records == 0
    journal(
        directory, {"logged": (2, short)}, [("logged", 1, o, NOW - 2 * HOUR) for o in range(30)]
    )
    assert (directory / STARTS_FILE).exists()
    _, again = brokers()
    restore(again, directory)
    assert read(again, "logged", 1) == [(o, b"v%d" % o) for o in range(30, 40)]


def test_a_million_short_lived_records_keep_the_broker_memory_bounded(tmp_path: Path) -> None:
    """1M `inference.logged` records of 300 bytes (300 MB of values, at a steady 30,000
    records/s) on a topic with a one-second retention: the keeper rotates the broker whenever
    it passes 64 MB, so its memory stays a fraction of what it was handed, and every kept
    record keeps its offset."""
    # The capture at the default niceness lags producers on a busy machine (by design), and
    # a rotation lets it catch up while clients still write to the old broker: here it keeps
    # pace, as on a machine with cores to spare.
    cfg = Settings(data_dir=tmp_path / "data", journal={"nice": 0})
    keeper = Keeper(cfg, rotate_bytes=64 * 2**20, check_seconds=0.2)
    keeper.start()
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            broker = keeper.broker
            if broker is not None and broker.process is not None:
                peak = max(peak, resident_bytes(broker.process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        kafka = KafkaConfig(bootstrap=keeper.bootstrap, embedded=True, gated=True)
        topic = "short.inference.logged"
        admin = AdminClient(kafka.admin())
        config = {"retention.ms": "1000", "cleanup.policy": "delete"}
        admin.create_topics([NewTopic(topic, 1, 1, config=config)])[topic].result(10)
        acked: list[tuple[int, bytes]] = []

        def delivered(error: Any, message: Any) -> None:
            assert error is None, error
            acked.append((message.offset(), message.key()))

        producer = Producer(
            kafka.producer(
                **{"compression.type": "none", "linger.ms": 20, "on_delivery": delivered}
            )
        )
        value = b"x" * 300
        total = 1_000_000
        # A steady load, as inference traffic is: a producer that outruns the journal's
        # capture (possible on a saturated machine) leaves the broker holding what capture
        # has not read yet, which no rotation may drop.
        rate, step = 30_000, 3_000
        started = time.monotonic()
        for first in range(0, total, step):
            for i in range(first, min(first + step, total)):
                while True:
                    try:
                        producer.produce(topic, value, b"%d" % i, partition=0)
                        break
                    except BufferError:
                        producer.poll(0.05)
                        keeper.check()
            producer.poll(0)
            keeper.check()  # the platform's main loop does this every tick
            ahead = started + (first + step) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        deadline = time.monotonic() + 300
        while producer.flush(1) and time.monotonic() < deadline:
            keeper.check()
        assert producer.flush(0) == 0
    finally:
        stop.set()
        sampler.join(5)
        rotations = len(keeper.cycles)
        keeper.stop()
    volume = total * len(value)
    assert rotations >= 2, "the broker was never rotated"
    assert peak < volume / 2, (
        f"the broker reached {peak / 2**20:.0f} MB for {volume / 2**20:.0f} MB"
    )
    assert sum(c.trimmed.records for c in keeper.cycles) > total // 2

    # The next start restores what retention kept, at the offsets the records had.
    time.sleep(1.1)  # past the retention of the last records: the start trims them too
    restarted = Keeper(cfg)
    _, restored = restarted.start()
    try:
        kafka = KafkaConfig(bootstrap=restarted.bootstrap, embedded=True)
        # Every record was acknowledged; a batch in flight when a broker was replaced may be
        # in the log twice (the first copy acknowledged to nobody), hence offsets past `total`.
        assert len({key for _, key in acked}) == total
        end = max(offset for offset, _ in acked[-1000:]) + 1
        assert restored.positions[topic] == {0: end}
        producer = Producer(kafka.producer())
        producer.produce(topic, b"next", partition=0)
        assert producer.flush(10) == 0
        assert read(kafka, topic, 0) == [(end, b"next")]  # the rest expired
    finally:
        restarted.stop()
