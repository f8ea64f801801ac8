"""Helpers of the archive tests: a mixed log, what the store holds row by row, and the
archive compared with the log."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence

import orjson
import pyarrow.parquet as pq
from confluent_kafka import Producer

from mlbus.consumers.archive.layout import list_files
from mlbus.consumers.archive.reader import read_archive
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import LogRecord, read_log
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import DEADLINE, dataset, progress, publish, requested

FAST = {  # the embedded broker's settings (a configured bootstrap keeps Kafka's defaults)
    "MLBUS_KAFKA__FETCH_WAIT_MAX_MS": "10",
    "MLBUS_KAFKA__SESSION_TIMEOUT_MS": "2000",
    "MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
}
TOPICS_USED = ["dataset.created", "training.requested", "training.progress"]
ALL = list(TOPICS)


def fill_log(kafka: KafkaConfig, n: int = 30) -> None:
    """Events on three topics, plus records the archive must keep although they are no
    valid events: garbage bytes, a keyless record, a CloudEvents binary-mode record."""
    publish(kafka, [dataset(name=f"ds{i % 7}", version=f"v{i}") for i in range(n)])
    publish(kafka, [requested(model=f"m{i % 5}") for i in range(n)])
    publish(kafka, [progress(model=f"m{i % 3}", epoch=i + 1, max_epochs=n) for i in range(n)])
    _, value = encode_new(progress(model="binary"), source="test")

    payload = orjson.dumps(orjson.loads(value)["data"])
    produce(
        kafka,
        "training.progress",
        [(b"binary", payload, None)],
        headers=[
            ("ce_specversion", b"1.0"),
            ("ce_id", b"binary-mode-id"),
            ("ce_source", b"test"),
            ("ce_type", b"training.progress"),
            ("content-type", b"application/json"),
        ],
    )
    produce(kafka, "dataset.created", [(b"ds0", b"\x00not json at all", None)])
    produce(kafka, "dataset.created", [(None, b'{"no": "key"}', None)])


def produce(
    kafka: KafkaConfig,
    event_type: str,
    records: Iterable[tuple[bytes | None, bytes, int | None]],
    *,
    headers: Sequence[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> None:
    """Raw records (key, value, CreateTime or None) with a plain producer (to `partition`,
    else by key)."""
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 1})
    failures: list[object] = []
    for key, value, ts in records:
        kwargs: dict[str, int] = {"timestamp": ts} if ts is not None else {}
        if partition is not None:
            kwargs["partition"] = partition
        producer.produce(
            kafka.topic(event_type),
            value,
            key,
            headers=list(headers if headers is not None else STRUCTURED_HEADERS),
            on_delivery=lambda err, msg: failures.append(err) if err else None,
            **kwargs,
        )
    assert producer.flush(DEADLINE) == 0 and not failures, failures


def ordered(records: Iterable[LogRecord]) -> list[LogRecord]:
    return sorted(records, key=lambda r: (r.topic, r.partition, r.offset))


def the_log(kafka: KafkaConfig, topics: Sequence[str] = ALL) -> list[LogRecord]:
    return ordered(read_log(kafka, topics))


def stored_rows(store: ObjectStore) -> list[tuple[str, int, int]]:
    """(topic, partition, offset) of every row of every archive file, read with plain
    pyarrow: duplicates here would be the archiver's fault, not hidden by the reader."""
    rows = []
    for f in list_files(store):
        table = pq.read_table(store.open(f.key), columns=["topic", "partition", "offset"])
        found = list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))
        assert {(t, p) for t, p, _ in found} == {(f.topic, f.partition)}, f.key
        assert [o for _, _, o in found] == sorted(o for _, _, o in found), f.key
        assert found[0][2] == f.first and found[-1][2] == f.last, f.key
        rows += found
    return rows


def assert_exactly_once(kafka: KafkaConfig, store: ObjectStore) -> list[LogRecord]:
    """The archive holds every record of the log once, byte for byte; returns the log."""
    rows = stored_rows(store)
    twice = [row for row, n in Counter(rows).items() if n > 1]
    assert not twice, f"{len(twice)} records archived more than once, e.g. {twice[:3]}"
    log = the_log(kafka)
    archived = ordered(read_archive(store))
    assert len(rows) == len(archived) == len(log)
    assert archived == log
    return log


def wait_for_archive(kafka: KafkaConfig, store: ObjectStore, timeout: float = DEADLINE) -> None:
    expected = len(the_log(kafka))
    deadline = time.monotonic() + timeout
    while len(stored_rows(store)) < expected:
        assert time.monotonic() < deadline, f"archive has {len(stored_rows(store))}/{expected}"
        time.sleep(0.2)
