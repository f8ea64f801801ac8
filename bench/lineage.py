"""The lineage store: projection rate, rebuild time and query latency, against a baseline
measured in the same run, on the same broker.

    .venv/bin/python bench/lineage.py [--events N] [--queries Q] [--postgres URL] [--json]

Measures, for a generated log of N records (tests/consumers/lineage/generator.py: every
topic, pipelines with parents, duplicates, undecodable records; default 1,000,000):

1. raw consume           plain `Consumer` reading the lineage topics to their end, values
                         not looked at (the broker's and librdkafka's share)
2. consume + decode      the same, plus the codec's `decode` of each value: the baseline
                         of the projection (the least any projector does)
3. projection → SQLite   `mlbus lineage rebuild --source archive`'s work: the log archived to
                         Parquet (by the archiver, on a local object store), read back with
                         `read_archive` and projected by `rebuild` (this process decoding, a
                         writer process writing) into a staging store, swapped in (target
                         >= 50,000 records/s; the archiving is not timed)
4. projection → Postgres the same into PostgreSQL (--postgres, or MLBUS_BENCH_POSTGRES_URL /
                         MLBUS_TEST_POSTGRES_URL; target >= 20,000 records/s)
   live store            the in-memory records projected into a live SQLite store (WAL, a
                         commit per batch, as `mlbus lineage project` writes): no target, for
                         comparison (--no-live to leave it out)
5. rebuild               `mlbus lineage rebuild` end to end from Kafka (read every record
                         from offset 0, project into a fresh SQLite file, swap it in)
6. upstream query        p50 / p99 of `LineageQueries.upstream` for random model versions
                         (and for "the serving version") in the rebuilt store (target p99
                         < 10 ms at 1,000,000 records)

The embedded broker is started in a temp dir (or MLBUS_BENCH_BOOTSTRAP is used) and stopped;
PostgreSQL gets a schema of its own, dropped at the end. Rates count every record fed,
including the undecodable ones, and for the in-memory feed the ones the projection does not
read (the data plane; the archive is read for the lineage topics only).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from bench.common import Figure, Figures, publish_summary, render_table
from mlbus.broker import EmbeddedBroker
from mlbus.consumers.archive.reader import read_archive
from mlbus.consumers.archive.writer import Archiver
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.rebuild import rebuild as rebuild_store
from mlbus.consumers.lineage.store import LineageStore, staging_for, swap_in
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import read_log
from mlbus.schemas.codec import decode
from mlbus.storage import ObjectStore
from tests.consumers.lineage.generator import as_log_records, generate_log, produce

SQLITE_TARGET = 50_000
POSTGRES_TARGET = 20_000
QUERY_P99_TARGET_MS = 10.0


class Report(Figures):
    def __init__(self, events: int, setup: dict[str, Any]) -> None:
        self.events = events
        self.setup = setup
        self.figures: dict[str, Figure] = {}


def now() -> float:
    return time.perf_counter()


def consume(kafka: KafkaConfig, expected: int, *, parse: bool) -> dict[str, Any]:
    """Read the lineage topics from the beginning to their end, group-less."""
    consumer = Consumer(
        kafka.consumer(None, **{"enable.partition.eof": True, "queued.min.messages": 1_000_000})
    )
    metadata = consumer.list_topics(timeout=10)
    partitions = [
        TopicPartition(kafka.topic(t), p, OFFSET_BEGINNING)
        for t in TOPICS
        for p in metadata.topics[kafka.topic(t)].partitions
    ]
    consumer.assign(partitions)
    remaining = {(tp.topic, tp.partition) for tp in partitions}
    count = decoded = 0
    started = None
    try:
        while remaining:
            batch = consumer.consume(1000, 0) or consumer.consume(1, 0.5)
            if started is None and batch:
                started = now()
            for m in batch:
                error = m.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard((m.topic(), m.partition()))
                    continue
                count += 1
                if parse:
                    try:
                        decode(m.value(), m.headers(), expected_type=kafka.event_type(m.topic()))
                        decoded += 1
                    except Exception:  # the undecodable ones are in the log too
                        pass
        seconds = now() - (started or now())
    finally:
        consumer.close()
    assert count == expected, f"read {count} records, expected {expected}"
    return {
        "records": count,
        "decoded": decoded,
        "seconds": round(seconds, 3),
        "rate": count / seconds if seconds else 0.0,
    }


def project_into(store: LineageStore, records: Iterable[Any], *, rebuild: bool) -> dict[str, Any]:
    """Project `records` into `store`: as a rebuild (into a staging copy, swapped in) or
    incrementally into the store itself."""
    started = now()
    if rebuild:
        staging = staging_for(store)
        stats = rebuild_store(staging, records)
        swap_in(staging, store)
    else:
        stats = Projector(store).project(records)
    seconds = now() - started
    return {
        "records": stats.records,
        "projected": stats.projected,
        "skipped": stats.skipped,
        "ignored": stats.ignored,
        "seconds": round(seconds, 3),
        "rate": stats.records / seconds,
    }


def rebuild(kafka: KafkaConfig, store: LineageStore) -> dict[str, Any]:
    started = now()
    staging = staging_for(store)
    stats = rebuild_store(staging, read_log(kafka, TOPICS))
    swap_in(staging, store)
    seconds = now() - started
    return {"records": stats.records, "seconds": round(seconds, 2), "rate": stats.records / seconds}


def query_latency(store: LineageStore, queries: int, seed: int = 3) -> dict[str, Any]:
    rng = random.Random(seed)
    dumped = []
    with store.reading() as conn:
        dumped = conn.exec_driver_sql(
            'SELECT "model", "version" FROM "model_versions" ORDER BY "event_id" LIMIT 20000'
        ).all()
    models = sorted({m for m, _ in dumped})
    q = LineageQueries(store)
    for model, version in dumped[:20]:  # warm the page cache and the statement cache
        q.upstream(model, version)
    latencies = []
    for i in range(queries):
        if i % 4 == 0:  # "what serves now, and where does it come from"
            model, version = rng.choice(models), None
        else:
            model, version = rng.choice(dumped)
        started = now()
        q.upstream(model, version)
        latencies.append((now() - started) * 1000)
    latencies.sort()
    return {
        "queries": queries,
        "p50_ms": round(latencies[len(latencies) // 2], 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3),
        "max_ms": round(latencies[-1], 3),
    }


def run(args: argparse.Namespace, log: Any) -> Report:
    n = args.events
    pg_url = (
        args.postgres
        or os.environ.get("MLBUS_BENCH_POSTGRES_URL")
        or os.environ.get("MLBUS_TEST_POSTGRES_URL", "")
    )
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlbus-bench-")))
        external = os.environ.get("MLBUS_BENCH_BOOTSTRAP")
        if external:
            bootstrap, embedded = external, os.environ.get("MLBUS_BENCH_EMBEDDED", "1") != "0"
        else:
            broker = stack.enter_context(EmbeddedBroker(tmp / "broker", record=False))
            bootstrap, embedded = broker.bootstrap, True
        kafka = KafkaConfig(
            bootstrap=bootstrap, embedded=embedded, topic_prefix=f"bench-{uuid.uuid4().hex[:8]}."
        )
        apply_topics(kafka)
        report = Report(
            n,
            {
                "broker": "external" if external else "embedded Tansu",
                "cpus": os.cpu_count(),
                "postgres": bool(pg_url),
            },
        )

        log(f"generating a log of {n:,} records ...")
        generated = generate_log(n, seed=1)
        records = as_log_records(generated)
        lineage_records = sum(1 for r in generated if r.topic in TOPICS)
        report.setup |= {
            "records": len(records),
            "lineage_records": lineage_records,
            "mean_bytes": round(sum(len(r.value) for r in generated) / len(generated)),
        }
        log("producing it ...")
        produce(kafka, generated, timeout=600)
        del generated

        log("raw consume ...")
        r = consume(kafka, lineage_records, parse=False)
        report.add(Figure("raw_consume", "raw consume (lineage topics)", r["rate"], detail=r))
        log("consume + decode ...")
        r = consume(kafka, lineage_records, parse=True)
        report.add(
            Figure("decode", "consume + decode (baseline)", r["rate"], "raw_consume", detail=r)
        )

        log("archiving it to Parquet ...")
        archive = ObjectStore((tmp / "archive").as_uri())
        archived = Archiver(kafka, archive, group=f"bench-archive-{uuid.uuid4().hex[:8]}").run(
            stop_at_end=True, install_signal_handlers=False
        )
        report.setup["archived_records"] = archived.records

        log("projection into SQLite (rebuild from the archive) ...")
        sqlite_store = LineageStore(f"sqlite:///{tmp / 'bench.db'}")
        r = project_into(sqlite_store, read_archive(archive, TOPICS), rebuild=True)
        report.add(
            Figure(
                "sqlite",
                "projection → SQLite (rebuild, from the archive)",
                r["rate"],
                "decode",
                f">= {SQLITE_TARGET:,}/s",
                r["rate"] >= SQLITE_TARGET,
                r,
            )
        )
        sqlite_store.close()
        if pg_url:
            log("projection into PostgreSQL (rebuild from the archive) ...")
            pg = LineageStore.open(pg_url, schema=f"bench_{uuid.uuid4().hex[:8]}")
            try:
                r = project_into(pg, read_archive(archive, TOPICS), rebuild=True)
            finally:
                pg.drop()
                pg.close()
            report.add(
                Figure(
                    "postgres",
                    "projection → PostgreSQL (rebuild, from the archive)",
                    r["rate"],
                    "decode",
                    f">= {POSTGRES_TARGET:,}/s",
                    r["rate"] >= POSTGRES_TARGET,
                    r,
                )
            )
        if args.live:
            log("projection into a live SQLite store (from memory) ...")
            live = LineageStore.open(f"sqlite:///{tmp / 'live.db'}")
            r = project_into(live, records, rebuild=False)
            report.add(
                Figure(
                    "sqlite_live",
                    "projection → SQLite (live store, WAL)",
                    r["rate"],
                    "decode",
                    detail=r,
                )
            )
            live.close()
        del records

        log("rebuild from Kafka into SQLite ...")
        target = LineageStore(f"sqlite:///{tmp / 'rebuilt.db'}")
        r = rebuild(kafka, target)
        report.add(
            Figure(
                "rebuild",
                f"rebuild from Kafka ({r['records']:,} records)",
                r["seconds"],
                unit="s",
                detail=r,
            )
        )

        log("upstream query latency ...")
        store = LineageStore(target.url)
        r = query_latency(store, args.queries)
        store.close()
        report.add(Figure("query_p50", "upstream query p50", r["p50_ms"], unit="ms", detail=r))
        report.add(
            Figure(
                "query_p99",
                "upstream query p99",
                r["p99_ms"],
                unit="ms",
                target=f"< {QUERY_P99_TARGET_MS:g} ms",
                ok=r["p99_ms"] < QUERY_P99_TARGET_MS,
                detail=r,
            )
        )
        return report


def table(report: Report) -> str:
    rows = []
    for f in report.figures.values():
        ratio = report.ratio(f)
        value = f"{f.value:,.0f} {f.unit}" if f.unit == "events/s" else f"{f.value:,.2f} {f.unit}"
        verdict = "" if f.ok is None else ("ok" if f.ok else "MISSED")
        rows.append(
            [
                f.label,
                value,
                f"{ratio:.2f}x {f.baseline_key}" if ratio else "",
                f"{f.target} {verdict}".strip(),
            ]
        )
    lines = render_table(
        ["figure", "value", "ratio to baseline", "target"], rows, right=frozenset({1})
    )
    setup = ", ".join(f"{k}={v}" for k, v in report.setup.items())
    return "\n".join([f"lineage benchmark: {setup}", *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="records in the log")
    parser.add_argument("--queries", type=int, default=2000, help="upstream queries timed")
    parser.add_argument("--postgres", default="", help="PostgreSQL URL (default: env)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument(
        "--no-live",
        dest="live",
        action="store_false",
        help="skip the projection into a live SQLite store",
    )
    args = parser.parse_args(argv)
    if args.events < 1000:
        parser.error("--events must be >= 1000")

    def log(message: str) -> None:
        print(f"[bench/lineage] {message}", file=sys.stderr, flush=True)

    started = now()
    report = run(args, log)
    publish_summary("lineage", report)
    report.setup["wall_seconds"] = round(now() - started, 1)
    if args.json:
        print(
            json.dumps(
                {
                    "setup": report.setup,
                    "figures": {
                        k: {
                            "value": f.value,
                            "unit": f.unit,
                            "ratio": report.ratio(f),
                            "ok": f.ok,
                            "detail": f.detail,
                        }
                        for k, f in report.figures.items()
                    },
                }
            )
        )
    else:
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
