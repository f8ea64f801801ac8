"""Group-less reading: whole topics from the beginning, or only what comes after now, with
the end of a partition found by enable.partition.eof (never the high-water mark)."""

from __future__ import annotations

import threading
import time

from confluent_kafka import Consumer

from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import TopicReader, read_log
from mlbus.schemas.codec import decode
from mlbus.schemas.training import TrainingProgress


def _publish(kafka, n: int, start: int = 0) -> list[str]:
    with EventProducer(kafka, source="test") as producer:
        return [
            producer.publish(
                TrainingProgress(
                    run_id=f"r{i}",
                    model=f"m{i % 3}",
                    epoch=i,
                    max_epochs=100,
                    metrics={},
                    samples_per_second=1.0,
                )
            ).id
            for i in range(start, start + n)
        ]


def test_reads_every_partition_to_its_end_and_stops(kafka):
    ids = _publish(kafka, 12)
    topic = kafka.topic("training.progress")
    got = [decode(m.value()).id for m in TopicReader(kafka, [topic])]
    assert sorted(got) == sorted(ids)


def test_empty_topic_ends_at_once(kafka):
    assert list(TopicReader(kafka, [kafka.topic("serving.alert")])) == []


def test_start_at_end_yields_only_new_records(kafka):
    _publish(kafka, 5)
    reader = TopicReader(kafka, [kafka.topic("training.progress")], start="end", follow=True)
    seen: list[str] = []

    def read() -> None:
        for message in reader:
            seen.append(decode(message.value()).id)

    thread = threading.Thread(target=read)
    thread.start()
    assert reader.caught_up.wait(20), "the reader never reached the end of the topic"
    new = _publish(kafka, 3, start=100)
    deadline = time.monotonic() + 20
    while len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    reader.stop()
    thread.join(10)
    assert sorted(seen) == sorted(new)


def test_reading_changes_no_consumer_offsets(kafka, group):
    _publish(kafka, 3)
    list(TopicReader(kafka, [kafka.topic("training.progress")]))
    consumer = Consumer(kafka.consumer(group))
    try:
        from confluent_kafka.admin import AdminClient

        groups = AdminClient(kafka.admin()).list_consumer_groups().result()
        assert "mlbus-reader-unused" not in {g.group_id for g in groups.valid}
    finally:
        consumer.close()


def test_read_log_keeps_records_whole_and_filters_by_time(kafka):
    from confluent_kafka import Producer

    topic = kafka.topic("serving.alert")
    producer = Producer(kafka.producer())
    for i, ts in enumerate([1_000, 5_000, 9_000]):  # CreateTime set by the producer
        producer.produce(topic, value=b"v%d" % i, key=b"k", timestamp=ts, headers=[("h", b"x")])
    producer.flush(10)
    everything = list(read_log(kafka, ["serving.alert"]))
    assert [(r.topic, r.key, r.value, r.headers) for r in everything] == [
        ("serving.alert", b"k", b"v0", (("h", b"x"),)),
        ("serving.alert", b"k", b"v1", (("h", b"x"),)),
        ("serving.alert", b"k", b"v2", (("h", b"x"),)),
    ]  # the contract name, without the test's topic prefix
    assert [r.offset for r in everything] == [0, 1, 2]
    window = list(read_log(kafka, ["serving.alert"], since_ms=5_000, until_ms=8_999))
    assert [(r.value, r.timestamp_ms) for r in window] == [(b"v1", 5_000)]
