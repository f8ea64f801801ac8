"""Throughput of the mlbus event bus against plain confluent-kafka, in one run, on one broker.

    .venv/bin/python bench/bus.py [--events N] [--repeat R] [--json] [--profile] [--no-pin]

Measures, against the same broker (an embedded Tansu broker started in a temp dir, or the
one at MLBUS_BENCH_BOOTSTRAP):

1. raw produce      plain `Producer`, mlbus's producer settings, pre-encoded mlbus records
2. raw consume      plain `Consumer`, batch `consume()`, values not even looked at
3. json.loads loop  plain `Consumer` + stdlib `json.loads` per value: the least any consumer
                    does, and the baseline of the mlbus consumer loop
4. mlbus produce    `EventProducer.publish(payload)` + `flush()` (encoding included)
5. mlbus consume    `ConsumerLoop` (decode + validate + dispatch + batched commits) with a
                    trivial handler
6. codec            envelope encode / wrap+encode / encode+decode round trip, no broker

"One core": the benchmark process (the Python loop *and* librdkafka's threads) is pinned to
CPU 0 and every thread of the broker to CPU 1 (skipped with fewer than two CPUs, or with an
external broker, whose process is not ours). Consume figures are best of --repeat runs, each
with a fresh consumer group reading the same pre-produced topic from the beginning, timed
from the first message in hand to the last one processed: the consumer-group join (about
1 s on the embedded broker) is excluded and printed separately. The end of the topic is
known by the message count (and `enable.partition.eof`), never by watermarks, which the
embedded broker gets wrong (docs/broker.md).

`Consumer.consume(n, timeout)` returns only when it has n messages or the timeout expired;
ConsumerLoop avoids that wait (mlbus.kafka.consumer.next_batch), and so do the hand-written
loops (`consume(1000, 0) or consume(1, 0.5)`). Pauses longer than STALL (50 ms) between two
records are reported, and left out of every consume figure; the "incl. consume() wait" row
keeps them in for ConsumerLoop.

The codec figures run without the broker, in short chunks interleaved between operations,
best chunk kept: this machine is a shared VM whose speed varies by 20-40 % from second to
second. GC stays enabled everywhere (as in a service); the benchmark's own pools are frozen
out of it (gc.freeze) so that they do not slow collections down.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from pydantic import ValidationError

from bench.common import Figure, Figures, publish_summary, render_table
from mlbus.broker import EmbeddedBroker
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import Payload
from mlbus.schemas.catalog import ANY_EVENT, EVENT_MODELS, TOPICS
from mlbus.schemas.codec import STRUCTURED_HEADERS, decode, encode, encode_new, wrap
from mlbus.schemas.serving import InferenceLogged
from mlbus.schemas.training import TrainingProgress

CONSUME_TARGET_RATIO = 0.80
CONSUME_TARGET_RATE = 50_000
CODEC_TARGET_RATE = 100_000
BATCH = 1000  # consume() batch size of the hand-written loops = ConsumerLoop's default
CONSUME_TIMEOUT = 60.0  # a consume phase that has not finished by then is broken
_EOF = KafkaError._PARTITION_EOF

PerfCounter = Callable[[], float]
now: PerfCounter = time.perf_counter


# -- payloads ------------------------------------------------------------------------------

MODELS = [f"model-{i:02d}" for i in range(48)]  # record keys: spread over every partition
METRIC_NAMES = [
    "train.loss", "train.accuracy", "validation.loss", "validation.accuracy",
]  # fmt: skip


def training_progress(rng: random.Random, i: int) -> TrainingProgress:
    """A per-epoch progress report: ~575 bytes as an mlbus record."""
    return TrainingProgress(
        run_id=f"run-{rng.getrandbits(48):012x}",
        model=MODELS[i % len(MODELS)],
        epoch=i % 50,
        max_epochs=50,
        metrics={name: rng.random() for name in METRIC_NAMES},
        samples_per_second=rng.uniform(1_000, 50_000),
    )


def inference_logged(rng: random.Random, i: int) -> InferenceLogged:
    """A sampled prediction record with its input summary: ~590 bytes."""
    return InferenceLogged(
        request_id=f"req-{rng.getrandbits(64):016x}",
        model=MODELS[i % len(MODELS)],
        version=f"v{1 + i % 7}",
        replica=f"serving-{i % 3}",
        latency_seconds=rng.uniform(0.0005, 0.05),
        batch_size=1,
        predictions=[rng.random()],
        feature_names=["amount", "age", "merchant_risk", "velocity"],
        inputs=[[round(rng.uniform(0, 100), 3) for _ in range(4)]],
    )


SHAPES: dict[str, Callable[[random.Random, int], Payload]] = {
    "training.progress": training_progress,
    "inference.logged": inference_logged,
}


def payload_pool(event_type: str, size: int, seed: int = 7) -> list[Payload]:
    rng = random.Random(seed)
    make = SHAPES[event_type]
    return [make(rng, i) for i in range(size)]


# -- results -------------------------------------------------------------------------------


@dataclass
class Report(Figures):
    events: int
    repeat: int
    setup: dict[str, Any]
    figures: dict[str, Figure] = field(default_factory=dict)


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- pinning -------------------------------------------------------------------------------


def pin(broker_pid: int | None) -> dict[str, Any]:
    """Client process on CPU 0, every broker thread on CPU 1 (threads started later by
    either inherit the mask of the thread that starts them)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or not hasattr(os, "sched_setaffinity"):
        return {"pinned": False, "why": f"only {len(cpus)} CPU(s) available"}
    client_cpu, broker_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {client_cpu})
    info: dict[str, Any] = {"pinned": True, "client_cpu": client_cpu}
    if broker_pid is None:
        info["broker_cpu"] = None
        return info
    threads = 0
    for tid in os.listdir(f"/proc/{broker_pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {broker_cpu})
            threads += 1
        except ProcessLookupError:
            pass
    info |= {"broker_cpu": broker_cpu, "broker_threads": threads}
    return info


# -- produce -------------------------------------------------------------------------------


def produce_raw(
    kafka: KafkaConfig, topic: str, records: list[tuple[str, bytes]], warmup_topic: str
) -> dict[str, Any]:
    """Plain confluent-kafka with the settings mlbus uses (kafka.producer(): idempotence,
    acks=all, linger, lz4; error-only delivery reports), the same bytes, key and header."""
    failures: list[str] = []

    def on_delivery(error: KafkaError | None, message: Any) -> None:
        if error is not None:
            failures.append(error.str())

    conf = kafka.producer() | {"delivery.report.only.error": True, "on_delivery": on_delivery}
    producer = Producer(conf)
    # Warm up (InitProducerId, metadata, connections) outside the timed part.
    producer.produce(warmup_topic, records[0][1], records[0][0], headers=STRUCTURED_HEADERS)
    producer.flush(30)
    produce = producer.produce
    poll = producer.poll
    headers = STRUCTURED_HEADERS
    gc.collect()
    c0, t0 = cpu_seconds(), now()
    for key, value in records:
        while True:
            try:
                produce(topic, value, key, headers=headers)
                break
            except BufferError:
                poll(0.05)
    remaining = producer.flush(60)
    t1, c1 = now(), cpu_seconds()
    if remaining or failures:
        raise RuntimeError(f"raw produce: {remaining} unconfirmed, failures: {failures[:3]}")
    return {"rate": len(records) / (t1 - t0), "seconds": t1 - t0, "cpu": (c1 - c0) / (t1 - t0)}


def produce_mlbus(kafka: KafkaConfig, payloads: list[Payload], n: int) -> dict[str, Any]:
    """EventProducer.publish of payload instances (encoding included) + flush."""
    producer = EventProducer(kafka, source="mlbus/bench")
    warm_ref, warm = encode_new(payloads[0], source="mlbus/bench")
    producer.produce(kafka.topic("inference.logged"), warm, warm_ref.key)  # warm-up, elsewhere
    producer.flush()
    publish = producer.publish
    size = len(payloads)
    gc.collect()
    c0, t0 = cpu_seconds(), now()
    for i in range(n):
        publish(payloads[i % size])
    producer.flush(60)
    t1, c1 = now(), cpu_seconds()
    return {"rate": n / (t1 - t0), "seconds": t1 - t0, "cpu": (c1 - c0) / (t1 - t0)}


# -- consume -------------------------------------------------------------------------------


#: A pause between two consecutive records longer than this, on a topic that is fully
#: produced before the loop starts, is the loop waiting in consume() (for a batch to fill, or
#: on an empty queue); every consume figure leaves such pauses out (`rate_as_is` keeps them).
STALL = 0.05


def consume_raw(kafka: KafkaConfig, topic: str, expected: int, *, parse: bool) -> dict[str, Any]:
    """A hand-written loop over batch consume(): with `parse`, stdlib json.loads of each value
    and nothing else; without, the values are not touched. Same consumer settings as the
    mlbus loop (kafka.consumer() + enable.partition.eof) and the same batch size.

    consume(n, timeout) blocks until it has n messages *or* the timeout expired, so a loop
    that always asks with a timeout idles for the whole timeout whenever fewer than n records
    are left (at the very least before its last batch). This loop takes what is there without
    waiting, and blocks (for one record) only when nothing is: it never idles while records
    are available, which makes it the throughput ceiling for its per-record work."""
    group = f"bench-{'json' if parse else 'raw'}-{uuid.uuid4().hex[:8]}"
    consumer = Consumer(kafka.consumer(group) | {"enable.partition.eof": True})
    assigned: set[int] = set()
    consumer.subscribe([topic], on_assign=lambda c, ps: assigned.update(p.partition for p in ps))
    loads = json.loads
    consume = consumer.consume
    count = 0
    at_end: set[int] = set()
    t_subscribe = now()
    t0 = c0 = stalled = 0.0
    stalls = 0
    gc.collect()
    try:
        while True:
            asked = now()
            batch = consume(BATCH, 0) or consume(1, 0.5)
            if not batch:
                if now() - t_subscribe > CONSUME_TIMEOUT:
                    raise RuntimeError(f"{group}: only {count}/{expected} after {CONSUME_TIMEOUT}s")
                continue
            if not t0:
                c0, t0 = cpu_seconds(), now()
            elif (waited := now() - asked) > STALL:  # the same rule as for ConsumerLoop
                stalled += waited
                stalls += 1
            if parse:
                for message in batch:
                    if message.error() is not None:
                        if message.error().code() != _EOF:
                            raise KafkaException(message.error())
                        at_end.add(message.partition())
                        continue
                    loads(message.value())
                    count += 1
            else:
                for message in batch:
                    if message.error() is not None:
                        if message.error().code() != _EOF:
                            raise KafkaException(message.error())
                        at_end.add(message.partition())
                        continue
                    count += 1
            if count >= expected or (assigned and at_end >= assigned):
                break
        t1, c1 = now(), cpu_seconds()
    finally:
        consumer.close()
    if count != expected:
        raise RuntimeError(f"{group}: read {count} records, expected {expected}")
    busy = t1 - t0 - stalled
    return {
        "rate": count / busy,
        "seconds": busy,
        "rate_as_is": count / (t1 - t0),
        "stall_seconds": stalled,
        "stalls": stalls,
        "join_seconds": t0 - t_subscribe,
        "cpu": (c1 - c0) / busy,
    }


class Stopwatch:
    """The trivial handler: counts events, notes the first and last arrival and the pauses
    between consecutive events longer than STALL (about 0.15 µs per event in all)."""

    __slots__ = ("cpu_first", "cpu_last", "expected", "first", "n", "prev", "stalled", "stalls")

    def __init__(self, expected: int) -> None:
        self.n = 0
        self.expected = expected
        self.first = self.prev = self.stalled = self.cpu_first = self.cpu_last = 0.0
        self.stalls = 0

    def __call__(self, event: Any, record: Any) -> None:
        t = now()
        self.n += 1
        if self.n == 1:
            self.first, self.cpu_first = t, cpu_seconds()
        elif t - self.prev > STALL:
            self.stalled += t - self.prev
            self.stalls += 1
        if self.n == self.expected:
            self.cpu_last = cpu_seconds()
        self.prev = t


def consume_mlbus(kafka: KafkaConfig, event_type: str, expected: int) -> dict[str, Any]:
    """ConsumerLoop with its defaults (batch 1000, commit every 10k records or 1 s).

    Two figures: `rate` leaves out the time the loop sat in consume() waiting for a batch to
    fill (it asks consume(batch_size, 0.5), so it waits 0.5 s before its last, partial batch);
    `rate_as_is` is first-to-last event including that wait."""
    watch = Stopwatch(expected)
    loop = ConsumerLoop(
        kafka,
        group=f"bench-mlbus-{uuid.uuid4().hex[:8]}",
        handlers={event_type: watch},
        name="bench",
    )
    gc.collect()
    t_start = now()
    stats = loop.run(stop_at_end=True, install_signal_handlers=False, max_events=expected)
    if watch.n != expected or stats.deadlettered:
        raise RuntimeError(
            f"mlbus loop: handled {watch.n}/{expected}, dead-lettered {stats.deadlettered}"
        )
    span = watch.prev - watch.first
    busy = span - watch.stalled
    return {
        "rate": (expected - 1) / busy,
        "seconds": busy,
        "rate_as_is": (expected - 1) / span,
        "stall_seconds": watch.stalled,
        "stalls": watch.stalls,
        "join_seconds": watch.first - t_start,
        "commits": stats.commits,
        "cpu": (watch.cpu_last - watch.cpu_first) / busy,
    }


def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    top = max(runs, key=lambda r: r["rate"])
    rates = sorted(r["rate"] for r in runs)
    return top | {"runs": [round(r["rate"]) for r in runs], "median": rates[len(rates) // 2]}


# -- codec (no broker) ---------------------------------------------------------------------

CODEC_CHUNK = 5000


def codec_rates(payloads: list[Payload], n: int) -> dict[str, dict[str, Any]]:
    """Each operation over n events, in chunks of CODEC_CHUNK interleaved between the
    operations; the figure is the best chunk (this VM's CPU is shared: a chunk that the
    hypervisor or another process interrupted is slower, never faster)."""
    source = "mlbus/bench"
    encoded = [encode_new(p, source=source)[1] for p in payloads]
    spec_type = decode(encoded[0]).type
    size = len(payloads)

    def run_encode_new(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            encode_new(payloads[i % size], source=source)

    def run_wrap_encode(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            encode(wrap(payloads[i % size], source=source))

    def run_round_trip(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            decode(encode_new(payloads[i % size], source=source)[1], expected_type=spec_type)

    def run_decode(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            decode(encoded[i % size], expected_type=spec_type)

    def run_json_loads(lo: int, hi: int) -> None:
        loads = json.loads
        for i in range(lo, hi):
            loads(encoded[i % size])

    # Binary mode (`ce_*` headers, the payload as the value), as other systems send it.
    binary = [_binary_record(value) for value in encoded]
    model = EVENT_MODELS[spec_type]

    def run_decode_binary(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            value, headers = binary[i % size]
            decode(value, headers, expected_type=spec_type)

    def run_decode_binary_both_parses(lo: int, hi: int) -> None:
        # What decoding a binary-mode record cost before the mode was read from the headers:
        # the structured parses (by the topic's model, then the union) failed first.
        for i in range(lo, hi):
            value, headers = binary[i % size]
            for parse in (model.model_validate_json, ANY_EVENT.validate_json):
                try:  # noqa: SIM105 - as the old code did (suppress costs more)
                    parse(value)
                except ValidationError:
                    pass
            decode(value, headers, expected_type=spec_type)

    ops = {
        "encode_new": run_encode_new,
        "wrap_encode": run_wrap_encode,
        "round_trip": run_round_trip,
        "decode": run_decode,
        "json_loads": run_json_loads,
        "decode_binary": run_decode_binary,
        "decode_binary_both_parses": run_decode_binary_both_parses,
    }
    chunk = min(CODEC_CHUNK, n)
    rates: dict[str, list[float]] = {name: [] for name in ops}
    gc.collect()
    for lo in range(0, n - chunk + 1, chunk):
        for name, fn in ops.items():
            t0 = now()
            fn(lo, lo + chunk)
            rates[name].append(chunk / (now() - t0))
    out: dict[str, dict[str, Any]] = {}
    for name, rs in rates.items():
        ordered = sorted(rs)
        out[name] = {"rate": ordered[-1], "median": ordered[len(ordered) // 2], "chunks": len(rs)}
    out["_bytes"] = {"mean": sum(map(len, encoded)) / len(encoded)}
    return out


def _binary_record(structured: bytes) -> tuple[bytes, list[tuple[str, bytes | None]]]:
    """A structured-mode record as the same event in binary mode."""
    event = orjson.loads(structured)
    data = orjson.dumps(event.pop("data"))
    headers: list[tuple[str, bytes | None]] = [
        (f"ce_{k}", str(v).encode()) for k, v in event.items() if k != "datacontenttype"
    ]
    headers.append(("content-type", b"application/json"))
    return data, headers


# -- profile -------------------------------------------------------------------------------


def profile_mlbus(kafka: KafkaConfig, event_type: str, expected: int, top: int = 25) -> str:
    """cProfile of one ConsumerLoop pass from its first event on (the group join left out).
    cProfile inflates Python-level calls; read it for where, not for how fast."""
    profiler = cProfile.Profile()

    class Profiled(Stopwatch):
        __slots__ = ()

        def __call__(self, event: Any, record: Any) -> None:
            if self.n == 0:
                profiler.enable()
            super().__call__(event, record)

    watch = Profiled(expected)
    loop = ConsumerLoop(
        kafka,
        group=f"bench-prof-{uuid.uuid4().hex[:8]}",
        handlers={event_type: watch},
        name="bench",
    )
    loop.run(stop_at_end=True, install_signal_handlers=False, max_events=expected)
    profiler.disable()
    out = io.StringIO()
    out.write(
        f"cProfile of one mlbus ConsumerLoop pass over {expected:,} events, from the first "
        f"event (consume() includes its {watch.stalled:.2f} s wait for a last full batch):\n"
    )
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- the run -------------------------------------------------------------------------------


def run(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[Report, str | None]:
    n = args.events
    external = os.environ.get("MLBUS_BENCH_BOOTSTRAP")
    with ExitStack() as stack:
        if external:
            bootstrap, broker_pid = external, None
            embedded = os.environ.get("MLBUS_BENCH_EMBEDDED", "1") != "0"
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbus-bench-"))
            broker = stack.enter_context(EmbeddedBroker(Path(tmp), record=False))
            bootstrap, broker_pid, embedded = broker.bootstrap, broker.process.pid, True
        pinning = pin(broker_pid) if not args.no_pin else {"pinned": False, "why": "--no-pin"}
        report_pid = broker_pid
        import confluent_kafka

        setup = {
            "broker": "external (MLBUS_BENCH_BOOTSTRAP)"
            if external
            else "embedded Tansu (memory storage)",
            "bootstrap": bootstrap,
            "cpus": os.cpu_count(),
            "confluent_kafka": confluent_kafka.version()[0],
            "librdkafka": confluent_kafka.libversion()[0],
            "python": sys.version.split()[0],
            **pinning,
        }
        report = Report(events=n, repeat=args.repeat, setup=setup)
        run_id = uuid.uuid4().hex[:8]
        main = KafkaConfig(bootstrap=bootstrap, embedded=embedded, topic_prefix=f"bench-{run_id}.")
        raw = replace(main, topic_prefix=f"bench-{run_id}-raw.")
        used = (TOPICS["training.progress"], TOPICS["inference.logged"])
        for config in (main, raw):
            apply_topics(config, catalog=used)

        log(f"building {n:,} payloads and records ...")
        pool = payload_pool("training.progress", min(n, 4096))
        topic_type = "training.progress"
        payloads = [pool[i % len(pool)] for i in range(n)]
        records = []
        for p in payloads:
            ref, value = encode_new(p, source="mlbus/bench")
            records.append((ref.key, value))
        mean_bytes = sum(len(v) for _, v in records) / n
        setup["record_bytes"] = round(mean_bytes)
        setup["partitions"] = TOPICS[topic_type].partitions
        del payloads
        gc.collect()
        gc.freeze()  # the benchmark's own pools are not the collector's work in a service

        log("produce: raw confluent-kafka ...")
        r = produce_raw(raw, raw.topic(topic_type), records, raw.topic("inference.logged"))
        report.add(Figure("raw_produce", "raw confluent-kafka produce", r["rate"], detail=r))
        log("produce: mlbus EventProducer ...")
        r = produce_mlbus(main, pool, n)
        report.add(
            Figure(
                "mlbus_produce",
                "mlbus EventProducer.publish+flush",
                r["rate"],
                "raw_produce",
                detail=r,
            )
        )
        del records

        runs: dict[str, list[dict[str, Any]]] = {"raw": [], "json": [], "mlbus": []}
        topic = main.topic(topic_type)
        for i in range(args.repeat):  # interleaved, so that drift hits every loop alike
            log(f"consume: round {i + 1}/{args.repeat} ...")
            runs["raw"].append(consume_raw(main, topic, n, parse=False))
            runs["json"].append(consume_raw(main, topic, n, parse=True))
            runs["mlbus"].append(consume_mlbus(main, topic_type, n))
        r = best(runs["raw"])
        report.add(Figure("raw_consume", "raw confluent-kafka consume", r["rate"], detail=r))
        r = best(runs["json"])
        report.add(
            Figure(
                "json_loop",
                "consume + json.loads loop (baseline)",
                r["rate"],
                "raw_consume",
                detail=r,
            )
        )
        r = best(runs["mlbus"])
        loop = report.add(
            Figure(
                "mlbus_consume",
                "mlbus ConsumerLoop",
                r["rate"],
                "json_loop",
                f">= {CONSUME_TARGET_RATIO:.0%}, >= {CONSUME_TARGET_RATE / 1000:.0f}k/s",
                detail=r,
            )
        )
        ratio = report.ratio(loop) or 0.0
        loop.ok = ratio >= CONSUME_TARGET_RATIO and loop.value >= CONSUME_TARGET_RATE
        as_is = max(runs["mlbus"], key=lambda r: r["rate_as_is"])
        report.add(
            Figure(
                "mlbus_consume_as_is",
                "mlbus ConsumerLoop incl. consume() wait",
                as_is["rate_as_is"],
                "json_loop",
                detail=as_is | {"runs": [round(r["rate_as_is"]) for r in runs["mlbus"]]},
            )
        )

        profile = None
        if args.profile or (not loop.ok and not args.no_profile):
            log("profiling one more mlbus ConsumerLoop pass (cProfile) ...")
            profile = profile_mlbus(main, topic_type, n)

    # The broker is stopped: the codec needs none (and gets the client CPU to itself).
    if report_pid is not None:
        report.setup["broker_stopped"] = not Path(f"/proc/{report_pid}").exists()
    codec_n = args.codec_events or max(10_000, n // 4)
    report.setup["codec_events"] = codec_n
    for shape in SHAPES:
        log(f"codec: {shape} x {codec_n:,} ...")
        rates = codec_rates(payload_pool(shape, 1024, seed=11), codec_n)
        short = "progress" if shape == "training.progress" else "logged"
        info = rates.pop("_bytes")
        labels = {
            "encode_new": "(a) encode_new(payload)",
            "wrap_encode": "(b) encode(wrap(payload))",
            "round_trip": "(c) encode_new + decode",
            "decode": "(d) decode (validate) only",
            "json_loads": "    json.loads only",
            "decode_binary": "(e) decode, binary mode",
            "decode_binary_both_parses": "    binary, structured tried first",
        }
        baselines = {
            "decode": f"codec_{short}_json_loads",
            "decode_binary": f"codec_{short}_decode",
            "decode_binary_both_parses": f"codec_{short}_decode_binary",
        }
        for name, r in rates.items():
            targeted = name in ("encode_new", "wrap_encode", "round_trip")
            fig = Figure(
                f"codec_{short}_{name}",
                f"{labels[name]} [{short}, {info['mean']:.0f} B]",
                r["rate"],
                baselines.get(name),
                f"> {CODEC_TARGET_RATE / 1000:.0f}k/s" if targeted else "",
                detail=r,
            )
            if targeted:
                fig.ok = fig.value > CODEC_TARGET_RATE
            report.add(fig)
    return report, profile


# -- output --------------------------------------------------------------------------------


def table(report: Report) -> str:
    s = report.setup
    lines = []
    if s.get("pinned"):
        where = (
            f"broker (all {s['broker_threads']} threads) on CPU {s['broker_cpu']}"
            if s.get("broker_cpu") is not None
            else "broker not pinned (external process)"
        )
        lines.append(
            f"one core: this process (Python loop + librdkafka threads) pinned to CPU "
            f"{s['client_cpu']}; {where}"
        )
    else:
        lines.append(f"NOT pinned to one core: {s.get('why')}")
    lines.append(
        f"broker: {s['broker']} at {s['bootstrap']}; confluent-kafka {s['confluent_kafka']} "
        f"(librdkafka {s['librdkafka']}); Python {s['python']}"
    )
    lines.append(
        f"{report.events:,} training.progress records per phase (mean {s['record_bytes']} B, "
        f"{s['partitions']} partitions, lz4); consume figures best of {report.repeat}, "
        f"fresh group each, timed first message to last (group join excluded)"
    )
    header = ("name", "events/s", "baseline", "ratio", "target", "result")
    rows = []
    for f in report.figures.values():
        base = report.figures[f.baseline_key].value if f.baseline_key else None
        ratio = report.ratio(f)
        rows.append(
            (
                f.label,
                f"{f.value:,.0f}",
                f"{base:,.0f}" if base else "",
                f"{ratio:.2f}x" if ratio is not None else "",
                f.target,
                "" if f.ok is None else ("PASS" if f.ok else "FAIL"),
            )
        )
    lines += ["", *render_table(header, rows)]
    lines.append("")
    for key in ("raw_produce", "mlbus_produce"):
        d = report.figures[key].detail
        lines.append(
            f"{report.figures[key].label}: {d['seconds']:.2f} s, client CPU {d['cpu']:.0%}"
        )
    for key in ("raw_consume", "json_loop", "mlbus_consume"):
        d = report.figures[key].detail
        runs = ", ".join(f"{x:,}" for x in d["runs"])
        lines.append(
            f"{report.figures[key].label}: runs {runs}/s; best {d['seconds']:.2f} s, "
            f"client CPU {d['cpu']:.0%}, group join {d['join_seconds']:.2f} s (excluded)"
        )
    for key in ("json_loop", "mlbus_consume"):
        d = report.figures[key].detail
        lines.append(
            f"{report.figures[key].label}: {d['stalls']} pause(s) > {STALL * 1000:.0f} ms in "
            f"consume(), {d['stall_seconds']:.2f} s, left out (with them: "
            f"{d['rate_as_is']:,.0f}/s in that run)"
        )
    lines.append(
        "the hand-written loops call consume(1000, 0) and block (consume(1, 0.5)) only when "
        "nothing is queued, so they never idle while records are available"
    )
    lines.append(
        f"codec: no broker, best {CODEC_CHUNK:,}-event chunk of {report.setup['codec_events']:,}"
        " per operation, operations interleaved (median chunk in --json)"
    )
    return "\n".join(lines)


def as_json(report: Report) -> dict[str, Any]:
    figures = {}
    for f in report.figures.values():
        entry: dict[str, Any] = {"label": f.label, "value": round(f.value, 1), "unit": "events/s"}
        if f.baseline_key:
            entry |= {"baseline": f.baseline_key, "ratio": round(report.ratio(f) or 0.0, 4)}
        if f.target:
            entry |= {"target": f.target, "pass": f.ok}
        for k in (
            "seconds",
            "cpu",
            "join_seconds",
            "runs",
            "median",
            "commits",
            "stall_seconds",
            "stalls",
            "rate_as_is",
        ):
            if k in f.detail:
                v = f.detail[k]
                entry[k] = round(v, 4) if isinstance(v, float) else v
        figures[f.key] = entry
    checks = [f.ok for f in report.figures.values() if f.ok is not None]
    return {
        "benchmark": "bus",
        "events": report.events,
        "repeat": report.repeat,
        "setup": report.setup,
        "figures": figures,
        "pass": all(checks),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="records per phase")
    parser.add_argument("--repeat", type=int, default=5, help="consume phases: best of N")
    parser.add_argument("--codec-events", type=int, default=0, help="default: events/4")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPUs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one more mlbus loop pass (done anyway when the loop misses its target)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="no profile even when the loop misses"
    )
    args = parser.parse_args(argv)
    if args.events < 1000 or args.repeat < 1:
        parser.error("--events must be >= 1000 and --repeat >= 1")

    def log(message: str) -> None:
        print(f"[bench/bus] {message}", file=sys.stderr, flush=True)

    started = now()
    report, profile = run(args, log)
    publish_summary("bus", report)
    report.setup["wall_seconds"] = round(now() - started, 1)
    if args.json:
        print(json.dumps(as_json(report)))
    else:
        print(table(report))
        stopped = report.setup.get("broker_stopped")
        state = {
            True: "embedded broker stopped",
            False: "EMBEDDED BROKER STILL RUNNING",
            None: "external broker left running",
        }[stopped]
        print(f"total wall time {report.setup['wall_seconds']} s; {state}")
    if profile:
        print(profile, file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
