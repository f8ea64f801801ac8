"""Throughput of the stream processors against hand-written aiokafka loops, in one run, on
one broker.

    .venv/bin/python bench/streams.py [--events N] [--json]

Measures, against the same broker (an embedded Tansu broker started in a temp dir, or the
one at MLBUS_BENCH_BOOTSTRAP), over the same pre-produced `inference.logged` topic:

1. raw consume      plain `AIOKafkaConsumer.getmany`, partitions assigned (no group), values
                    not looked at: the ceiling of any aiokafka-based processor
2. hand-written     the same consumer + `orjson.loads` + the same window aggregates in plain
                    dicts (count, errors, latency sketch buckets, classes, per-feature bins
                    against the training histogram): the baseline of the faust app
3. faust app        `streams.app.StreamsApp` in this process: faust app whose transport hands
                    the agent's topic over a fetch at a time (streams/transport.py), the
                    decode of what the engine reads (streams/logged.py: the contract's
                    rules for those fields; refused records to the codec's decode and the
                    dead letters), the window engine, its table
                    changelog (producer_max_batch_size=1), outputs through the EventProducer;
                    the feedback join off (`streams.feedback=false`): the windowed
                    aggregation alone, what the hand loop and quixstreams compute
   + feedback join  the same app with the feedback join on (its default: a second reader of
                    inference.logged in a thread of the same process, docs/streams.md), run
                    once, for what the join costs; no target
4. quixstreams      the same windows and aggregates written with quixstreams (what a user
                    would pick instead of faust), bench/peers/quix_streams.py, run by the python
                    of a separate environment (`make bench-peers`, bench/peers/README.md; found
                    through --quix-python or MLBUS_BENCH_QUIX_PYTHON); skipped, and said so,
                    when that environment is missing
5. breakdown        without a broker: the codec's decode_dict (every field validated), the
                    app's decode (streams/logged.py), engine apply alone (where the faust
                    app's time goes)

Rates are timed from the first batch in hand to the last record processed, so the group
join and table recovery are excluded. Raw, hand loop and app are run `--repeat` times (the
hand loop and the app alternating) and the best of each is kept: on a shared machine
interference only ever slows a run down (docs/performance.md). quixstreams runs once: it is
an order of magnitude slower, and its figure is only compared with the app's. The end is
known by count, never by end offsets (wrong on the embedded broker, docs/broker.md).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from confluent_kafka import Producer

from bench.common import Figure, Figures, publish_summary, render_table
from mlbus.broker import EmbeddedBroker
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import EMBEDDED_FETCH_WAIT_MS, KafkaConfig
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import STRUCTURED_HEADERS, decode_dict, encode_new, wrap
from mlbus.schemas.datasets import ColumnSchema, ColumnStats, DatasetCreated, Histogram
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.serving import InferenceLogged
from mlbus.services import service
from mlbus.settings import StreamsSettings
from mlbus.streams import sketch
from mlbus.streams.drift import Baselines

TARGET_RATE = 20_000
TARGET_RATIO = 0.5
TARGET_PEER_RATIO = 1.0  # the faust app against quixstreams
ROOT = Path(__file__).resolve().parent.parent
QUIX_ENV = "MLBUS_BENCH_QUIX_PYTHON"
QUIX_DEFAULT = ROOT / ".bench-peers" / "quix" / "bin" / "python"
EDGES = [float(i) for i in range(11)]
COUNTS = [10, 40, 90, 160, 200, 200, 160, 90, 40, 10]
FEATURES = ("f0", "f1", "f2", "f3")
BASE_MS = 1_767_225_600_000
WINDOW_MS = 10_000


def baseline() -> list[Any]:
    hist = ColumnStats(
        kind="numeric", null_count=0, histogram=Histogram(edges=EDGES, counts=COUNTS)
    )
    dataset = DatasetCreated(
        name="bench",
        version="ds1",
        uri="file:///tmp/bench.parquet",
        content_hash="sha256:" + "ab" * 32,
        arrow_schema=[ColumnSchema(name=f, type="double") for f in FEATURES],
        num_rows=1000,
        num_bytes=1,
        columns={f: hist for f in FEATURES},
    )
    promoted = [
        ModelPromoted(
            model=f"m{i}",
            version="v1",
            reason="bench",
            actor="bench",
            dataset=DatasetRef(name="bench", version="ds1"),
        )
        for i in range(4)
    ]
    return [dataset, *promoted]


def records(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """`n` inference.logged records of 4 models, ~2,000 per 10-second window."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        model = f"m{i % 4}"
        t = BASE_MS + i * 5  # 200 records per second of event time
        payload = InferenceLogged(
            request_id=f"r{i}",
            model=model,
            version="v1",
            replica="bench",
            latency_seconds=round(math.exp(rng.gauss(-3, 0.6)), 6),
            ok=i % 50 != 0,
            predictions=[rng.choice("abc")],
            feature_names=list(FEATURES),
            inputs=[[round(rng.uniform(0, 10), 3) for _ in FEATURES]],
        )
        _, value = encode_new(payload, source="bench", time=datetime.fromtimestamp(t / 1000, UTC))
        out.append((model, value))
    return out


def produce(kafka: KafkaConfig, topic: str, data: list[tuple[str, bytes]]) -> None:
    producer = Producer(kafka.producer(**{"linger.ms": 20, "enable.idempotence": False}))
    for key, value in data:
        while True:
            try:
                producer.produce(topic, value, key, headers=STRUCTURED_HEADERS)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise SystemExit("records not delivered")


# -- 1 and 2: aiokafka, raw and hand-written -------------------------------------------------


async def aiokafka_rate(
    kafka: KafkaConfig, topic: str, n: int, aggregate: bool
) -> tuple[float, float]:
    """Records per second, and the process's CPU microseconds per record."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        enable_auto_commit=False,
        group_id=None,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        windows: dict[tuple[str, str, int], dict[str, Any]] = {}
        seen, started, cpu = 0, None, 0.0
        while seen < n:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            if started is None and batches:
                started, cpu = time.perf_counter(), time.process_time()
            for messages in batches.values():
                seen += len(messages)
                if aggregate:
                    for message in messages:
                        _aggregate(windows, message.value)
        rate = n / (time.perf_counter() - (started or time.perf_counter()))
        return rate, (time.process_time() - cpu) / n * 1e6
    finally:
        await consumer.stop()


def _aggregate(windows: dict[tuple[str, str, int], dict[str, Any]], value: bytes) -> None:
    """What the engine computes per record, written by hand in plain dicts."""
    event = orjson.loads(value)
    data = event["data"]
    t = datetime.fromisoformat(event["time"]).timestamp() * 1000
    start = int(t - t % WINDOW_MS)
    key = (data["model"], data["version"], start)
    w = windows.get(key)
    if w is None:
        w = windows[key] = {
            "n": 0,
            "x": 0,
            "lat": {},
            "sum": 0.0,
            "max": 0.0,
            "cls": {},
            "bins": {f: [0] * 10 for f in FEATURES},
        }
    w["n"] += 1
    if not data.get("ok", True):
        w["x"] += 1
    latency = data["latency_seconds"]
    index = sketch.bucket_of(latency)
    w["lat"][index] = w["lat"].get(index, 0) + 1
    w["sum"] += latency
    w["max"] = max(w["max"], latency)
    for p in data.get("predictions", ()):
        w["cls"][str(p)] = w["cls"].get(str(p), 0) + 1
    bins = w["bins"]
    for j, name in enumerate(data.get("feature_names") or ()):
        counts = bins[name]
        for sample in data.get("inputs") or ():
            i = min(max(bisect.bisect_right(EDGES, sample[j]) - 1, 0), 9)
            counts[i] += 1


# -- 3: the faust app ---------------------------------------------------------------------------


def faust_rate(
    kafka: KafkaConfig, n: int, data_dir: Path, feedback: bool = False
) -> tuple[float, dict[str, Any]]:
    from mlbus.streams.app import StreamsApp, StreamsOptions

    settings = StreamsSettings(
        window_seconds=10, hopping_seconds=60, grace_seconds=5, feedback=feedback
    )
    options = StreamsOptions(
        app_id=f"{kafka.topic_prefix}bench-{uuid.uuid4().hex[:6]}",
        data_dir=data_dir,
        idle_seconds=600,
    )
    # A loop of its own for each app: a faust worker closes its loop when it stops, and the
    # next one in this process would otherwise be handed that closed loop.
    asyncio.set_event_loop(asyncio.new_event_loop())
    sa = StreamsApp(kafka, settings, options)
    marks: dict[str, Any] = {}
    processor = sa.processor
    handle = processor.handle

    # Timed as the hand loop is, from the first fetch in hand (the group join and table
    # recovery excluded) to the last record's effects durable, on the app's event loop at
    # each fetch: a thread polling the count would itself take the GIL from the app
    # hundreds of times a second.
    async def timed(messages: Any) -> None:
        if "first" not in marks:
            marks["first"] = time.perf_counter()
            marks["first_n"] = processor.processed + processor.deadlettered
            marks["cpu"] = time.process_time()
        await handle(messages)
        done = processor.processed + processor.deadlettered
        if done >= n and "last" not in marks:
            marks["last"] = time.perf_counter()
            marks["cpu"] = (time.process_time() - marks["cpu"]) / (done - marks["first_n"]) * 1e6
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful stop

    processor.handle = timed  # type: ignore[method-assign]  # the bench times the app from inside
    # The app's own librdkafka readers (the baselines, the feedback join) poll the embedded
    # broker at the streams service's pace, as under `mlbus run streams` (mlbus/cli/services.py
    # `polling`), not at this process's 10 ms: each poll costs the broker, on this machine.
    wait = EMBEDDED_FETCH_WAIT_MS[0]
    if service("streams").fetch_wait_ms is not None:
        EMBEDDED_FETCH_WAIT_MS[0] = service("streams").fetch_wait_ms
    try:
        sa.run()
    finally:
        EMBEDDED_FETCH_WAIT_MS[0] = wait
    if "last" not in marks:
        raise SystemExit("the faust app stopped before processing every record")
    rate = (n - marks["first_n"]) / (marks["last"] - marks["first"])
    detail = {"outputs_series": len(sa.engine.series)}
    return rate, detail | {"cpu_us": round(marks["cpu"], 2)}


# -- 4: quixstreams, in its own environment ---------------------------------------------------


def quix_python(option: str | None) -> Path | None:
    """The python of the quixstreams environment: --quix-python, MLBUS_BENCH_QUIX_PYTHON, or
    `make bench-peers`'s default; None when there is none."""
    for candidate in (option, os.environ.get(QUIX_ENV), str(QUIX_DEFAULT)):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def quix_rate(
    kafka: KafkaConfig, topic: str, n: int, python: Path, tumbling_only: bool = False
) -> tuple[float, dict[str, Any]]:
    # The same client settings as mlbus's consumers (fetch sizes, the embedded broker's
    # short group timeouts), minus what quixstreams sets itself.
    own = {"bootstrap.servers", "group.id", "enable.auto.commit", "auto.offset.reset", "logger"}
    config = {k: v for k, v in kafka.consumer(None).items() if k not in own and not callable(v)}
    config.pop("partition.assignment.strategy", None)  # quixstreams' own choice
    config = {k: v for k, v in config.items() if isinstance(v, str | int | float | bool)}
    with tempfile.TemporaryDirectory(prefix="mlbus-quix-") as state:
        command = [
            str(python),
            str(ROOT / "bench" / "peers" / "quix_streams.py"),
            f"--bootstrap={kafka.bootstrap}",
            f"--topic={topic}",
            f"--output={kafka.topic_prefix}quix-metrics",
            f"--group={kafka.topic_prefix}quix-{uuid.uuid4().hex[:6]}",
            f"--events={n}",
            f"--state-dir={state}",
            f"--window-ms={WINDOW_MS}",
            "--hopping-ms=60000",
            "--grace-ms=5000",
            f"--edges={json.dumps(EDGES)}",
            f"--counts={json.dumps(COUNTS)}",
            f"--consumer-config={json.dumps(config)}",
            *(["--tumbling-only"] if tumbling_only else []),
        ]
        # Its own environment only: no mlbus on its path.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"quixstreams run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    return float(result.pop("rate")), result


# -- 5: breakdown without a broker ----------------------------------------------------------------


def breakdown(data: list[tuple[str, bytes]]) -> dict[str, float]:
    from mlbus.streams.logged import logged_decoder
    from mlbus.streams.windows import Engine, WindowConfig

    values = [v for _, v in data]
    t0 = time.perf_counter()
    events = [decode_dict(v, expected_type="inference.logged") for v in values]
    decode_rate = len(values) / (time.perf_counter() - t0)
    read = logged_decoder()
    t0 = time.perf_counter()
    for v in values:
        read(v)
    read_rate = len(values) / (time.perf_counter() - t0)
    baselines = Baselines()
    for payload in baseline():
        baselines.add(wrap(payload, source="bench"))
    engine = Engine(WindowConfig.from_settings(StreamsSettings()), baselines)
    t0 = time.perf_counter()
    for offset, event in enumerate(events):
        engine.apply(0, offset, round(event["time"].timestamp() * 1000), event["data"])
    apply_rate = len(events) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    windows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for v in values:
        _aggregate(windows, v)
    hand_rate = len(values) / (time.perf_counter() - t0)
    return {
        "codec_decode": decode_rate,
        "app_decode": read_rate,
        "engine_apply": apply_rate,
        "hand_aggregate": hand_rate,
    }


class Report(Figures):
    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}


def run(
    events: int, log: Any, quix: Path | None = None, repeat: int = 3
) -> tuple[Report, dict[str, Any]]:
    report = Report()
    setup: dict[str, Any] = {
        "events": events,
        "repeat": repeat,
        "quixstreams": str(quix) if quix else None,
    }
    with ExitStack() as stack:
        external = os.environ.get("MLBUS_BENCH_BOOTSTRAP")
        if external:
            kafka = KafkaConfig(bootstrap=external, embedded=False)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbus-bench-"))
            broker = stack.enter_context(EmbeddedBroker(Path(tmp), record=False))
            kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True)
        kafka = replace(kafka, topic_prefix=f"bench{uuid.uuid4().hex[:6]}.")
        apply_topics(kafka)
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbus-streams-")))
        log(f"producing {events} inference.logged records")
        data = records(events)
        topic = kafka.topic("inference.logged")
        produce(kafka, topic, data)
        producer = Producer(kafka.producer())
        for payload in baseline():
            ref, value = encode_new(payload, source="bench")
            producer.produce(kafka.topic(ref.type), value, ref.key, headers=STRUCTURED_HEADERS)
        producer.flush(30)

        log("raw aiokafka consume")
        raw = max(
            asyncio.run(aiokafka_rate(kafka, topic, events, aggregate=False))[0]
            for _ in range(repeat)
        )
        report.add(Figure("raw", "raw aiokafka consume (getmany, no group)", raw))
        # The hand loop and the app alternate, so that both see the same spells of load
        # from whatever else runs on the machine; the best of each is kept.
        hands, hand_cpu, rates, details = [], [], [], []
        for attempt in range(repeat):
            log(f"hand-written aiokafka loop ({attempt + 1}/{repeat})")
            hand_rate, cpu = asyncio.run(aiokafka_rate(kafka, topic, events, aggregate=True))
            hands.append(hand_rate)
            hand_cpu.append(round(cpu, 2))
            log(f"faust app ({attempt + 1}/{repeat})")
            rate, detail = faust_rate(kafka, events, data_dir / f"run{attempt}")
            rates.append(rate)
            details.append(detail)
        hand, rate = max(hands), max(rates)
        detail = details[rates.index(rate)] | {
            "runs": [round(r) for r in rates],
            "cpu_us": [d["cpu_us"] for d in details],
        }
        report.add(
            Figure(
                "hand",
                "hand-written aiokafka + dict aggregates",
                hand,
                "raw",
                detail={"runs": [round(h) for h in hands], "cpu_us": hand_cpu},
            )
        )
        ok = rate >= TARGET_RATE and rate >= TARGET_RATIO * hand
        report.add(
            Figure(
                "faust",
                "faust app, windows (feedback join off)",
                rate,
                "hand",
                target=f">= {TARGET_RATE:,}/s and >= {TARGET_RATIO:.0%}",
                ok=ok,
                detail=detail,
            )
        )
        log("faust app with the feedback join")
        joined, joined_detail = faust_rate(kafka, events, data_dir / "feedback", feedback=True)
        report.add(
            Figure(
                "faust_feedback",
                "faust app + feedback join (2nd reader)",
                joined,
                "hand",
                detail=joined_detail,
            )
        )
        if quix is None:
            log(
                "quixstreams: skipped, no environment (make bench-peers, or "
                f"{QUIX_ENV}=<its python>; bench/peers/README.md)"
            )
        else:
            log(f"quixstreams ({quix})")
            peer, peer_detail = quix_rate(kafka, topic, events, quix)
            report.add(
                Figure(
                    "quix",
                    "quixstreams, same windows (tumbling + hopping)",
                    peer,
                    "hand",
                    detail=peer_detail,
                )
            )
            log("quixstreams, tumbling windows only")
            light, light_detail = quix_rate(kafka, topic, events, quix, tumbling_only=True)
            report.add(
                Figure(
                    "quix_tumbling",
                    "quixstreams, tumbling windows only",
                    light,
                    "hand",
                    detail=light_detail,
                )
            )
            report.add(
                Figure(
                    "faust_vs_quix",
                    "faust app against quixstreams",
                    rate,
                    "quix",
                    target=f">= {TARGET_PEER_RATIO:.1f}x",
                    ok=rate >= TARGET_PEER_RATIO * peer,
                )
            )
        log("breakdown without broker")
        for key, value in breakdown(data[: min(events, 20_000)]).items():
            report.add(Figure(key, f"no broker: {key.replace('_', ' ')}", value))
    return report, setup


def table(report: Report) -> str:
    rows = []
    for f in report.figures.values():
        ratio = report.ratio(f)
        rows.append(
            [
                f.label,
                f"{f.value:,.0f}",
                f"{ratio:.2f}" if ratio is not None else "",
                f.target + ("" if f.ok is None else (" ok" if f.ok else " MISSED")),
            ]
        )
    lines = render_table(["figure", "events/s", "ratio", "target"], rows)
    for f in report.figures.values():
        if "runs" in f.detail:
            lines.append(f"{f.key} runs: " + ", ".join(f"{r:,}" for r in f.detail["runs"]))
            cpu = ", ".join(f"{c:.1f}" for c in f.detail["cpu_us"])
            lines.append(f"{f.key} CPU per record, µs (whole process, timed span): {cpu}")
        elif f.key.startswith("quix") or f.key == "faust_feedback":
            lines.append(f"{f.key}: {json.dumps(f.detail)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of raw, hand loop and app; best kept"
    )
    parser.add_argument(
        "--quix-python",
        help=f"python of the quixstreams environment (default: ${QUIX_ENV}, else {QUIX_DEFAULT})",
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[bench/streams] {message}", file=sys.stderr, flush=True)

    report, setup = run(args.events, log, quix_python(args.quix_python), args.repeat)
    publish_summary("streams", report)
    if args.json:
        print(json.dumps({k: f.value for k, f in report.figures.items()} | setup))
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
