"""The embedded broker's journal (mlbus/journal/): what it costs producers, how fast a
restore is, and how long after its acknowledgement a record is on disk — in one run.

    .venv/bin/python bench/journal.py [--records N] [--repeat R] [--probes P]

1. produce, journal off   plain `Producer` with mlbus's producer settings, N pre-encoded
                          records (CloudEvents of inference.logged, ~400 bytes) + flush
2. produce, journal on    the same while a journal capture runs in its own process, as under
                          `mlbus up`; off and on alternate, best of R each; ratio on / off
3. restore                the journal of (2) replayed into a fresh broker (records/s)
4. ack → on disk          P single records: from the producer's acknowledgement to the
                          journal's fsync covering it (durable.json), as `mlbus publish` waits
                          — the loss bound of a power cut (median, p99, max); once with the
                          records 50-230 ms apart (the capture fetching), once 2 s apart
                          (the capture idle, watching the partitions' ends)
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer

from bench.common import render_table
from mlbus.broker import EmbeddedBroker
from mlbus.journal.format import wait_durable
from mlbus.journal.restore import restore
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.codec import STRUCTURED_HEADERS

TOPIC = "inference.logged"


def _capture(kafka: KafkaConfig, directory: str, ready: Any, stop: Any) -> None:
    from mlbus.journal.capture import Capture
    from mlbus.settings import JournalSettings

    cfg = JournalSettings()  # `mlbus up`'s defaults
    capture = Capture(
        kafka,
        Path(directory),
        sync_seconds=cfg.sync_ms / 1000,
        snapshot_seconds=cfg.snapshot_seconds,
        fetch_wait_ms=cfg.fetch_wait_ms,
        watch_ms=cfg.watch_ms,
        nice=cfg.nice,
    )
    capture.start()
    ready.set()
    stop.wait()
    capture.stop(60)


class Journal:
    """A capture in its own process, as `mlbus up` runs it apart from the producers."""

    def __init__(self, kafka: KafkaConfig, directory: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready, self.stop_event = context.Event(), context.Event()
        self.process = context.Process(
            target=_capture, args=(kafka, str(directory), self.ready, self.stop_event)
        )
        self.process.start()
        if not self.ready.wait(60):
            raise RuntimeError("the journal capture did not start")

    def stop(self) -> None:
        self.stop_event.set()
        self.process.join(120)


def produce(kafka: KafkaConfig, values: list[bytes]) -> float:
    producer = Producer(kafka.producer(**{"delivery.report.only.error": True}))
    headers = list(STRUCTURED_HEADERS)
    topic = kafka.topic(TOPIC)
    started = time.perf_counter()
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value, b"model-%d" % (i % 12), headers=headers)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("records not delivered")
    return len(values) / (time.perf_counter() - started)


def ack_to_disk(
    kafka: KafkaConfig, directory: Path, probes: int, apart: float | None = None
) -> list[float]:
    """`probes` single records, each waited for on disk; then a pause of `apart` seconds
    (None: 50-230 ms, landing at different points of the sync interval)."""
    delays = []
    acked: dict[tuple[str, int], int] = {}

    def on_delivery(error: Any, message: Any) -> None:
        acked[(message.topic(), message.partition())] = message.offset()

    producer = Producer(kafka.producer(on_delivery=on_delivery))
    for i in range(probes):
        acked.clear()
        producer.produce(kafka.topic(TOPIC), b"probe", b"probe-%d" % i)
        producer.flush(10)
        at = time.perf_counter()
        wait_durable(directory, dict(acked), 10)
        delays.append(time.perf_counter() - at)
        time.sleep(apart if apart is not None else 0.05 + (i % 7) * 0.03)
    return sorted(delays)


def _spread(delays: list[float]) -> str:
    """Median / p99 / max of sorted `delays`, in ms."""
    p99 = delays[max(0, int(len(delays) * 0.99) - 1)]
    return f"{delays[len(delays) // 2] * 1000:.0f} / {p99 * 1000:.0f} / {delays[-1] * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--probes", type=int, default=100)
    args = parser.parse_args()
    value = b'{"specversion":"1.0","type":"inference.logged","data":{' + b'"x":1,' * 55 + b"}}"
    values = [value] * args.records
    work = Path(tempfile.mkdtemp(prefix="mlbus-bench-journal-"))
    off: list[float] = []
    on: list[float] = []
    try:
        for run in range(args.repeat):
            for journaled in (False, True):
                with EmbeddedBroker(work / f"broker-{run}-{journaled}", record=False) as broker:
                    kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
                    apply_topics(kafka)
                    journal = Journal(kafka, work / "journal") if journaled else None
                    rate = produce(kafka, values)
                    (on if journaled else off).append(rate)
                    if journal is not None:
                        if run == args.repeat - 1:
                            delays = ack_to_disk(kafka, work / "journal", args.probes)
                            time.sleep(3)  # the capture goes idle
                            idle = ack_to_disk(
                                kafka, work / "journal", max(10, args.probes // 5), apart=2.0
                            )
                        journal.stop()
                        if run < args.repeat - 1:
                            shutil.rmtree(work / "journal")
        with EmbeddedBroker(work / "broker-restore", record=False) as broker:
            kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
            apply_topics(kafka)
            restored = restore(kafka, work / "journal")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best_off, best_on = max(off), max(on)
    rows = [
        ["produce, journal off", f"{best_off:,.0f}/s", "", ""],
        ["produce, journal on", f"{best_on:,.0f}/s", f"{best_on / best_off:.2f}x", ">= 0.9x"],
        [
            f"restore ({restored.records:,} records)",
            f"{restored.rate:,.0f}/s",
            "",
            ">= 100,000/s",
        ],
        ["ack → on disk, median / p99 / max", _spread(delays), "", "<= 1 s"],
        ["ack → on disk, idle capture", _spread(idle), "", "<= 1 s"],
    ]
    print(f"journal benchmark: {args.records:,} records, best of {args.repeat}")
    print("runs off: " + ", ".join(f"{r:,.0f}" for r in off))
    print("runs on:  " + ", ".join(f"{r:,.0f}" for r in on))
    print("\n".join(render_table(["figure", "value", "ratio", "target"], rows)))


if __name__ == "__main__":
    main()
