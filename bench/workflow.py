"""Decision latency of the workflow manager: from `training.completed` published to its
`model.promoted` received, against a raw relay on the same broker, in one run.

    .venv/bin/python bench/workflow.py [--completions N] [--json]

Against one broker (an embedded Tansu broker started in a temp dir, or the one at
MLBUS_BENCH_BOOTSTRAP):

1. raw relay        the same two hops without mlbus: a plain Producer writes a record, a
                    plain Consumer + Producer thread copies it to a second topic, a plain
                    Consumer receives it. The least any "consume, decide, publish" service
                    can cost on this broker: the baseline.
2. workflow         `WorkflowService` (the real consumer loop, state, policy, an idempotent
                    producer confirming each decision before the next record) with a
                    pipeline governing the model; each completion beats the champion, so
                    each becomes a `model.promoted`, read by a group-less reader.

Completions are sent one at a time (the next when the previous decision arrived): the
figure is the latency of one decision, not the queueing of a burst. p50 and p99 over N
(default 1,000); target p99 < 200 ms. Times are taken in this process (perf_counter) at
produce and at receipt.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from bench.common import render_table, summary_line
from mlbus.broker import EmbeddedBroker
from mlbus.consumers.workflow.definitions import apply
from mlbus.consumers.workflow.service import WorkflowService
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import TopicReader
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import decode
from mlbus.schemas.training import Artifact, CodeVersion, TrainingCompleted

TARGET_P99_MS = 200.0
WARM_UP = 5  # round trips left out of the figures (connections, first fetches)
WAIT = 30.0  # a decision that has not arrived by then is broken
SHA = "sha256:" + "ab" * 32

PIPELINE = """\
name: bench
dataset: bench-data
model: bench
family: mlp
policy:
  name: bench-policy
  metric: test.accuracy
  thresholds:
    - {metric: test.accuracy, op: ">=", value: 0.1}
"""


def completion(i: int) -> TrainingCompleted:
    return TrainingCompleted(
        run_id=f"run-{i}",
        model="bench",
        version=f"v{i}",
        request_id=f"req-{i}",
        family="mlp",
        dataset=DatasetRef(name="bench-data", version="d1"),
        artifact=Artifact(uri=f"file:///bench/v{i}/model.safetensors", sha256=SHA),
        metrics={"test": {"accuracy": 0.2 + i * 1e-4, "loss": 1.0 - i * 1e-4}},
        epochs=1,
        code=CodeVersion(package_version="bench"),
        duration_seconds=1.0,
    )


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {
        "p50_ms": pick(0.50) * 1e3,
        "p99_ms": pick(0.99) * 1e3,
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def _plain_consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-unused",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    return consumer


def raw_relay(bootstrap: str, prefix: str, n: int) -> list[float]:
    """Latency of produce → relay (consume + produce) → consume with plain clients."""
    first, second = f"{prefix}relay.in", f"{prefix}relay.out"
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for topic in (first, second):  # auto-created with the broker's defaults
        producer.produce(topic, b"warm-up")
    producer.flush(10)
    stop = threading.Event()

    def relay() -> None:
        consumer = _plain_consumer(bootstrap, first)
        out = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 0,
                "acks": "all",
                "enable.idempotence": True,
            }
        )
        while not stop.is_set():
            message = consumer.poll(0.1)
            if message is None or message.error() is not None or message.value() == b"warm-up":
                continue
            out.produce(second, message.value(), message.key())
            out.flush(10)
        consumer.close()

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    receiver = _plain_consumer(bootstrap, second)
    value = b"x" * 900  # about the size of a training.completed
    samples = []
    try:
        for i in range(n + WARM_UP):
            key = str(i).encode()
            sent = time.perf_counter()
            producer.produce(first, value, key)
            producer.flush(10)
            deadline = sent + WAIT
            while True:
                message = receiver.poll(0.05)
                if message is not None and message.error() is None and message.key() == key:
                    if i >= WARM_UP:  # the first ones wait for the relay's first fetch
                        samples.append(time.perf_counter() - sent)
                    break
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"raw relay: record {i} never came back")
    finally:
        stop.set()
        thread.join()
        receiver.close()
    return samples


def workflow(kafka: KafkaConfig, n: int, log: Any) -> list[float]:
    apply(kafka, PIPELINE, source="bench", actor="bench")
    decisions: queue.Queue[tuple[str | None, float]] = queue.Queue()
    reader = TopicReader(
        kafka,
        [kafka.topic("model.promoted"), kafka.topic("model.rejected")],
        follow=True,
        poll_timeout=0.05,
    )

    def read() -> None:
        for message in reader:
            got = time.perf_counter()
            event = decode(message.value(), message.headers())
            decisions.put((event.causationid, got))

    threading.Thread(target=read, daemon=True).start()
    samples = []
    with WorkflowService(kafka, group=f"bench-{uuid.uuid4().hex[:8]}") as service:
        loop = threading.Thread(
            target=service.loop.run, kwargs={"install_signal_handlers": False}, daemon=True
        )
        loop.start()
        with EventProducer(kafka, source="bench", **{"linger.ms": 0}) as producer:
            producer.publish(completion(0))  # warm-up: the group join is not a decision
            producer.flush()
            decisions.get(timeout=WAIT)
            for i in range(1, n + 1):
                sent = time.perf_counter()
                ref = producer.publish(completion(i))
                producer.flush()
                while True:
                    cause, got = decisions.get(timeout=WAIT)
                    if cause == ref.id:
                        samples.append(got - sent)
                        break
                if i % 200 == 0:
                    log(f"workflow: {i:,}/{n:,} decisions")
        service.loop.stop()
        loop.join()
        promoted = sum(1 for m in service.state.models["bench"].promotions)
    reader.stop()
    if promoted != n + 1:
        raise RuntimeError(f"expected {n + 1} promotions, the service made {promoted}")
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[bench/workflow] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with ExitStack() as stack:
        external = os.environ.get("MLBUS_BENCH_BOOTSTRAP")
        if external:
            bootstrap, embedded = external, os.environ.get("MLBUS_BENCH_EMBEDDED", "1") != "0"
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbus-bench-"))
            broker = stack.enter_context(EmbeddedBroker(Path(tmp), record=False))
            bootstrap, embedded = broker.bootstrap, True
        run_id = uuid.uuid4().hex[:8]
        kafka = KafkaConfig(bootstrap=bootstrap, embedded=embedded, topic_prefix=f"bench-{run_id}.")
        used = tuple(
            TOPICS[t]
            for t in (
                "pipeline.defined",
                "dataset.validated",
                "training.requested",
                "training.completed",
                "training.failed",
                "model.promoted",
                "model.rejected",
                "serving.alert",
            )
        )
        apply_topics(kafka, catalog=used)
        log(f"raw relay: {args.completions:,} round trips ...")
        base = percentiles(raw_relay(bootstrap, f"bench-{run_id}-raw.", args.completions))
        log(f"workflow: {args.completions:,} completions ...")
        mine = percentiles(workflow(replace(kafka), args.completions, log))
    ratio = {k: mine[k] / base[k] for k in ("p50_ms", "p99_ms")}
    result = {
        "completions": args.completions,
        "broker": "external" if external else "embedded Tansu",
        "baseline_raw_relay": base,
        "workflow": mine,
        "ratio": ratio,
        "target_p99_ms": TARGET_P99_MS,
        "ok": mine["p99_ms"] < TARGET_P99_MS,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    summary_line("workflow", "raw relay p99 (baseline)", base["p99_ms"], "ms")
    summary_line(
        "workflow",
        "training.completed -> model.promoted p50",
        mine["p50_ms"],
        "ms",
        baseline="raw relay p50",
        ratio=ratio["p50_ms"],
    )
    summary_line(
        "workflow",
        "training.completed -> model.promoted p99",
        mine["p99_ms"],
        "ms",
        baseline="raw relay p99",
        ratio=ratio["p99_ms"],
        target=f"< {TARGET_P99_MS:.0f} ms",
        ok=result["ok"],
    )
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [
        [
            "raw relay (baseline)",
            f"{base['p50_ms']:.1f}",
            f"{base['p99_ms']:.1f}",
            f"{base['max_ms']:.1f}",
            "",
            "",
        ],
        [
            "training.completed -> model.promoted",
            f"{mine['p50_ms']:.1f}",
            f"{mine['p99_ms']:.1f}",
            f"{mine['max_ms']:.1f}",
            f"x{ratio['p50_ms']:.2f} / x{ratio['p99_ms']:.2f}",
            f"p99 < {TARGET_P99_MS:.0f} ms: {'ok' if result['ok'] else 'MISSED'}",
        ],
    ]
    header = ["latency, ms", "p50", "p99", "max", "ratio p50/p99", "target"]
    print(f"{args.completions:,} completions, one at a time, {result['broker']} broker")
    print("\n".join(render_table(header, rows, right=frozenset({1, 2, 3, 4}))))
    print(f"total wall time {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
