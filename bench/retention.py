"""The embedded broker's memory under a steady stream of short-lived records: the same records
(N of 300 bytes on one partition with a 1 s retention) sent through `mlbus up`'s keeper
(mlbus/journal/keeper.py) with rotation off (the baseline: the broker keeps every record) and
on (a bound of `--rotate-mb`), in the same run. Prints the broker's peak resident memory and
the producer's throughput for both, and the ratios.

    python bench/retention.py [--records 1000000] [--rotate-mb 64]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from mlbus.broker import resident_bytes
from mlbus.journal.keeper import Keeper
from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings

TOPIC = "bench.inference.logged"
VALUE = b"x" * 300


def run(root: Path, records: int, rotate_mb: int) -> dict[str, float]:
    data = root / f"rotate-{rotate_mb}"
    shutil.rmtree(data, ignore_errors=True)
    keeper = Keeper(Settings(data_dir=data), rotate_bytes=rotate_mb * 2**20, check_seconds=0.2)
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
        admin = AdminClient(kafka.admin())
        config = {"retention.ms": "1000", "cleanup.policy": "delete"}
        admin.create_topics([NewTopic(TOPIC, 1, 1, config=config)])[TOPIC].result(10)
        producer = Producer(kafka.producer(**{"compression.type": "none", "linger.ms": 20}))
        started = time.perf_counter()
        for i in range(records):
            while True:
                try:
                    producer.produce(TOPIC, VALUE, b"%d" % i, partition=0)
                    break
                except BufferError:
                    producer.poll(0.05)
                    keeper.check()  # what `mlbus up`'s main loop does every tick
            if i % 20_000 == 0:
                keeper.check()
        while producer.flush(1):
            keeper.check()
        seconds = time.perf_counter() - started
    finally:
        stop.set()
        sampler.join(5)
        keeper.stop()
        shutil.rmtree(data, ignore_errors=True)
    return {
        "peak_mb": peak / 2**20,
        "rate": records / seconds,
        "rotations": len(keeper.cycles),
        "rotation_s": max((c.seconds for c in keeper.cycles), default=0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--rotate-mb", type=int, default=64)
    args = parser.parse_args()
    volume = args.records * len(VALUE) / 2**20
    with tempfile.TemporaryDirectory(prefix="mlbus-retention-") as tmp:
        base = run(Path(tmp), args.records, rotate_mb=1 << 20)  # never reached: no rotation
        kept = run(Path(tmp), args.records, rotate_mb=args.rotate_mb)
    print(f"{args.records:,} records, {volume:.0f} MB of values, retention 1 s")
    print(f"baseline (no rotation): broker peak {base['peak_mb']:.0f} MB, {base['rate']:,.0f}/s")
    print(
        f"mlbus (rotate at {args.rotate_mb} MB): broker peak {kept['peak_mb']:.0f} MB, "
        f"{kept['rate']:,.0f}/s, {kept['rotations']:.0f} rotations, "
        f"longest {kept['rotation_s']:.1f}s"
    )
    print(
        f"ratios: peak memory {kept['peak_mb'] / base['peak_mb']:.2f}x, "
        f"throughput {kept['rate'] / base['rate']:.2f}x"
    )


if __name__ == "__main__":
    main()
