"""What an idle consumer costs the embedded broker, and how fast it reacts, with and without
the journal's wake-up (mlbus/kafka/quiet.py) — in one run, on one broker.

    .venv/bin/python bench/quiet.py [--consumers N] [--records R] [--seconds S]

A journal capture runs as under `mlbus up` (its default fetch wait). Then, for each mode:
N consumer loops (each its own group, reading training.progress, six partitions) at the
services' default fetch wait (mlbus/services.py) sit idle for S seconds — the broker's CPU
over that window is the idle cost, the journal's capture included — and then R records are
published one at a time, far enough apart for the loops to be idle again (`--spacing`),
each timed from its acknowledgement to the first loop's handler.

- fetching: the loops fetch all the time (no journal known to them: a real cluster's case);
- quiet:    the loops know the journal: idle, they stop fetching until it has a record.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import render_table
from mlbus.broker import EmbeddedBroker
from mlbus.journal.capture import Capture
from mlbus.kafka import config, quiet
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.training import TrainingProgress
from mlbus.services import Service
from mlbus.settings import JournalSettings

TICK = os.sysconf("SC_CLK_TCK")
TOPIC = "training.progress"


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run(kafka: KafkaConfig, broker_pid: int, args: argparse.Namespace, mode: str) -> list[str]:
    received: dict[str, float] = {}
    seen = threading.Condition()

    def handle(event: object, record: object) -> None:
        with seen:
            received.setdefault(event.id, time.monotonic())  # type: ignore[attr-defined]
            seen.notify_all()

    loops = [
        ConsumerLoop(kafka, group=f"bench-{mode}-{i}", name=f"{mode}-{i}", handlers={TOPIC: handle})
        for i in range(args.consumers)
    ]
    threads = [
        threading.Thread(target=loop.run, kwargs={"install_signal_handlers": False}, daemon=True)
        for loop in loops
    ]
    for thread in threads:
        thread.start()
    time.sleep(3 + quiet.QUIET_AFTER)  # joined and, for the quiet mode, quiet
    before, start = _cpu(broker_pid), time.monotonic()
    time.sleep(args.seconds)
    idle = 100 * (_cpu(broker_pid) - before) / (time.monotonic() - start)
    latencies = []
    with EventProducer(kafka, source="bench/quiet") as producer:
        for i in range(args.records):
            time.sleep(random.uniform(1.0, 3.0) + args.spacing)  # quiet by then, in that mode
            event = TrainingProgress(
                run_id=f"{mode}-{i}",
                model="bench",
                epoch=1,
                max_epochs=1,
                metrics={},
                samples_per_second=0.0,
            )
            ref = producer.publish(event, key=f"bench-{i}")
            producer.flush()
            acked = time.monotonic()
            with seen:
                seen.wait_for(lambda ref=ref: ref.id in received, timeout=30)
            latencies.append(1000 * (received.get(ref.id, float("inf")) - acked))
    for loop in loops:
        loop.stop()
    for thread in threads:
        thread.join(30)
    latencies.sort()
    return [
        mode,
        f"{idle:.2f}%",
        f"{statistics.median(latencies):,.0f}",
        f"{latencies[int(0.9 * (len(latencies) - 1))]:,.0f}",
        f"{latencies[-1]:,.0f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--spacing", type=float, default=quiet.QUIET_AFTER, help="seconds between records, +1-3"
    )
    args = parser.parse_args()
    config.EMBEDDED_FETCH_WAIT_MS[0] = Service.__dataclass_fields__["fetch_wait_ms"].default
    journal_settings = JournalSettings()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp), record=False) as broker:
        kafka = KafkaConfig(broker.bootstrap, embedded=True)
        apply_topics(kafka)
        journal = Path(tmp) / "journal"
        capture = Capture(
            kafka,
            journal,
            sync_seconds=journal_settings.sync_ms / 1000,
            fetch_wait_ms=journal_settings.fetch_wait_ms,
            nice=0,
        )
        capture.start()
        try:
            assert broker.process is not None
            pid = broker.process.pid
            rows = [
                run(kafka, pid, args, "fetching"),
                run(replace(kafka, journal=str(journal)), pid, args, "quiet"),
            ]
        finally:
            capture.stop()
    print(
        f"{args.consumers} idle consumer loops of {TOPIC} (6 partitions); fetch wait "
        f"{KafkaConfig('', embedded=True).consumer('g')['fetch.wait.max.ms']} ms fetching, "
        f"{KafkaConfig('', embedded=True, journal='j').consumer('g')['fetch.wait.max.ms']} ms "
        f"quiet (after {quiet.QUIET_AFTER:.0f} s idle); journal fetch wait "
        f"{journal_settings.fetch_wait_ms} ms, sync {journal_settings.sync_ms} ms; "
        f"{args.records} records, {args.spacing:.0f}-{args.spacing + 3:.0f} s apart; broker CPU "
        "idle includes the journal's capture"
    )
    print(
        "\n".join(
            render_table(
                ["mode", "broker CPU idle", "ack → handler median ms", "p90 ms", "max ms"],
                rows,
                right=frozenset({1, 2, 3, 4}),
            )
        )
    )
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
