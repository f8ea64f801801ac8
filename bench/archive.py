"""Archive benchmark, in one process against one embedded broker: the archiver's write rate
next to a raw group-less read of the same topics (its baseline), and `read_archive`'s rate
next to a raw pyarrow read of the same files (its baseline).

    .venv/bin/python bench/archive.py [--events 200000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow.parquet as pq
from confluent_kafka import Producer

from bench.common import summary_line
from mlbus.broker import EmbeddedBroker
from mlbus.consumers.archive.layout import list_files
from mlbus.consumers.archive.reader import read_archive
from mlbus.consumers.archive.writer import Archiver
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import read_log
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.training import TrainingProgress
from mlbus.storage import ObjectStore

TOPIC = "training.progress"


def fill(kafka: KafkaConfig, events: int) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 20})
    for i in range(events):
        payload = TrainingProgress(
            run_id=f"r{i % 100}",
            model=f"m{i % 50}",
            epoch=i % 10 + 1,
            max_epochs=10,
            metrics={"loss": 0.5},
            samples_per_second=1.0,
        )
        ref, value = encode_new(payload, source="bench")
        while True:
            try:
                producer.produce(kafka.topic(TOPIC), value, ref.key, headers=STRUCTURED_HEADERS)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>12,.0f} records/s ({n} in {seconds:.2f}s)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-archive-"))
    with EmbeddedBroker(tmp / "broker", record=False) as broker:
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True, topic_prefix="bench.")
        apply_topics(kafka)
        fill(kafka, args.events)
        store = ObjectStore((tmp / "store").as_uri())

        t = time.perf_counter()
        raw = sum(1 for _ in read_log(kafka, [TOPIC]))
        raw_s = time.perf_counter() - t
        t = time.perf_counter()
        stats = Archiver(kafka, store, group="bench", flush_bytes=64 * 1024 * 1024).run(
            stop_at_end=True, install_signal_handlers=False
        )
        write_s = time.perf_counter() - t
        assert stats.records == raw == args.events, (stats, raw)

        files = list_files(store)
        t = time.perf_counter()
        pyarrow_rows = 0
        for f in files:
            table = pq.read_table(store.path(f.key))
            pyarrow_rows += len(table.column("value").to_pylist())
        pyarrow_s = time.perf_counter() - t
        t = time.perf_counter()
        read = sum(1 for _ in read_archive(store, [TOPIC]))
        read_s = time.perf_counter() - t
        assert read == pyarrow_rows == args.events

    summary_line("archive", "read_log, group-less (baseline)", raw / raw_s, "records/s")
    summary_line(
        "archive",
        "archiver: read + Parquet + commit",
        stats.records / write_s,
        "records/s",
        baseline="read_log",
        ratio=raw_s / write_s,
    )
    summary_line(
        "archive",
        "pyarrow read_table + to_pylist (baseline)",
        pyarrow_rows / pyarrow_s,
        "records/s",
    )
    summary_line(
        "archive",
        "read_archive (LogRecords)",
        read / read_s,
        "records/s",
        baseline="pyarrow",
        ratio=pyarrow_s / read_s,
    )
    print(f"write  baseline read_log (group-less read)     {rate(raw, raw_s)}")
    print(f"write  mlbus archiver (read + Parquet + commit) {rate(stats.records, write_s)}")
    print(f"       ratio archiver/read_log                  {raw_s / write_s:.2f}")
    print(f"read   baseline pyarrow read_table + to_pylist  {rate(pyarrow_rows, pyarrow_s)}")
    print(f"read   mlbus read_archive (LogRecords)          {rate(read, read_s)}")
    print(f"       ratio read_archive/pyarrow               {pyarrow_s / read_s:.2f}")
    print(f"       {len(files)} files, {stats.bytes / 1e6:.1f} MB Parquet")


if __name__ == "__main__":
    main()
