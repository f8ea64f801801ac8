"""A generated log for the lineage and archive tests: every contract topic, realistic
pipelines (datasets with parents → requests → runs with progress → completions or failures
→ promotions, rejections, rollbacks → deployments, alerts), plus the data plane, records
that do not decode, events that refer to datasets nobody announced, cross-topic interleaving
shuffled and duplicate deliveries of the same record.

    records = generate_log(50_000, seed=1)
    ends = produce(kafka, records)           # {(contract topic, partition): next offset}
    log = as_log_records(records)            # in memory, as the archive would return them

Deterministic for a given seed (event ids, times and order).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.base import Payload
from mlbus.schemas.catalog import DEADLETTER, TOPICS
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.datasets import DatasetCreated, DatasetValidated
from mlbus.schemas.deadletter import DeadLetter
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted, ModelRejected
from mlbus.schemas.serving import (
    InferenceLogged,
    InferenceRequest,
    InferenceResult,
    ServingAlert,
    ServingMetrics,
)
from mlbus.schemas.training import (
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)
from mlbus.schemas.workflow import PipelineDefined

EPOCH = datetime(2026, 3, 1, tzinfo=UTC)
HEADERS = tuple(STRUCTURED_HEADERS)


@dataclass(frozen=True)
class GenRecord:
    topic: str  # contract name, without prefix
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes | None], ...] = HEADERS


def _sha(rng: random.Random) -> str:
    return "sha256:" + rng.randbytes(32).hex()


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.clock = EPOCH
        self.out: list[GenRecord] = []
        self.counter = 0

    def emit(self, payload: Payload, *, cause: Any = None) -> Any:
        self.clock += timedelta(milliseconds=self.rng.randint(1, 500))
        self.counter += 1
        event_id = (
            f"{zlib.crc32(repr((self.counter, self.rng.random())).encode()):08x}-"
            f"{self.counter:012d}"
        )
        ref, value = encode_new(
            payload,
            source="tests/generator",
            causation=cause,
            event_id=event_id,
            time=self.clock,
        )
        self.out.append(GenRecord(ref.type, ref.key.encode() if ref.key else None, value))
        return ref

    def garbage(self, topic: str, key: str) -> None:
        value = self.rng.choice([b"{not json", b'{"specversion": "1.0"}', b"[]", b'"x"'])
        self.out.append(GenRecord(topic, key.encode(), value))


def generate_log(events: int = 50_000, seed: int = 1) -> list[GenRecord]:
    """About `events` records (a little more: the last pipeline is finished)."""
    b = _Builder(seed)
    rng = b.rng
    datasets: list[tuple[str, str]] = []
    models = [f"model-{i}" for i in range(8)]
    champion: dict[str, list[str]] = {}
    n = 0
    while len(b.out) < events:
        n += 1
        model = rng.choice(models)
        dname = f"data-{n % 13}"
        version = f"v{n}"
        parents = (
            [{"name": p[0], "version": p[1]} for p in rng.sample(datasets, min(2, len(datasets)))]
            if datasets and rng.random() < 0.5
            else []
        )
        created = b.emit(
            DatasetCreated.model_validate(
                {
                    "name": dname,
                    "version": version,
                    "uri": f"s3://bucket/{dname}/{version}.parquet",
                    "content_hash": _sha(rng),
                    "arrow_schema": [{"name": "x", "type": "double"}],
                    "num_rows": rng.randint(10, 10_000),
                    "num_bytes": rng.randint(100, 10**6),
                    "parents": parents,
                    "tags": {"team": rng.choice(["a", "b"])},
                    "created_by": "etl",
                }
            )
        )
        datasets.append((dname, version))
        b.emit(
            DatasetValidated.model_validate(
                {
                    "name": dname,
                    "version": version,
                    "uri": f"s3://bucket/{dname}/{version}.parquet",
                    "content_hash": _sha(rng),
                    "num_rows": 10,
                    "validator": "v",
                    "checks": ["hash"],
                }
            ),
            cause=created,
        )
        if n % 9 == 0:
            b.emit(
                PipelineDefined.model_validate(
                    {
                        "name": f"pipe-{model}",
                        "revision": n,
                        "dataset": dname,
                        "model": model,
                        "family": "mlp",
                        "policy": {"name": "default", "version": 1},
                        "actor": "alice",
                    }
                )
            )
        # an unknown upstream now and then: a request on a dataset nobody announced
        trained_on = {"name": dname, "version": version}
        if rng.random() < 0.05:
            trained_on = {"name": "ghost", "version": f"g{n}"}
        for attempt in range(rng.randint(1, 2)):
            hyper = {"lr": rng.choice([0.1, 0.01]), "hidden": rng.choice([32, 64])}
            request = b.emit(
                TrainingRequested.model_validate(
                    {
                        "model": model,
                        "dataset": trained_on,
                        "family": "mlp",
                        "hyperparameters": hyper,
                        "requested_by": rng.choice(["alice", "workflow"]),
                        "pipeline": f"pipe-{model}",
                    }
                ),
                cause=created,
            )
            run_id = f"run-{n}-{attempt}"
            b.emit(
                TrainingStarted.model_validate(
                    {
                        "run_id": run_id,
                        "model": model,
                        "request_id": request.id,
                        "dataset": trained_on,
                        "worker": f"w{rng.randint(1, 3)}",
                    }
                ),
                cause=request,
            )
            epochs = rng.randint(2, 6)
            for epoch in range(1, epochs + 1):
                b.emit(
                    TrainingProgress.model_validate(
                        {
                            "run_id": run_id,
                            "model": model,
                            "epoch": epoch,
                            "max_epochs": epochs,
                            "metrics": {"loss": round(rng.random(), 4)},
                            "samples_per_second": 100.0,
                        }
                    ),
                    cause=request,
                )
            if rng.random() < 0.15:
                b.emit(
                    TrainingFailed.model_validate(
                        {
                            "run_id": run_id,
                            "model": model,
                            "request_id": request.id,
                            "reason": "out of memory",
                            "retryable": True,
                        }
                    ),
                    cause=request,
                )
                continue
            mversion = f"{model}-{n}-{attempt}"
            accuracy = round(rng.random(), 4)
            completed = b.emit(
                TrainingCompleted.model_validate(
                    {
                        "run_id": run_id,
                        "model": model,
                        "version": mversion,
                        "request_id": request.id,
                        "family": "mlp",
                        "dataset": trained_on,
                        "artifact": {"uri": f"s3://bucket/models/{mversion}", "sha256": _sha(rng)},
                        "metrics": {"test": {"accuracy": accuracy}},
                        "hyperparameters": hyper,
                        "epochs": epochs,
                        "code": {"package_version": "0.1.0", "git_commit": "abc123"},
                        "duration_seconds": round(rng.random() * 100, 3),
                    }
                ),
                cause=request,
            )
            history = champion.setdefault(model, [])
            if rng.random() < 0.6:
                b.emit(
                    ModelPromoted.model_validate(
                        {
                            "model": model,
                            "version": mversion,
                            "run_id": run_id,
                            "previous_version": history[-1] if history else None,
                            "reason": "better",
                            "actor": "workflow",
                            "policy": {"name": "default", "version": 1},
                            "evidence": {"test.accuracy": accuracy},
                        }
                    ),
                    cause=completed,
                )
                history.append(mversion)
                for replica in ("r1", "r2"):
                    b.emit(
                        DeploymentUpdated.model_validate(
                            {
                                "model": model,
                                "version": mversion,
                                "replica": replica,
                                "status": "loaded",
                            }
                        )
                    )
            else:
                b.emit(
                    ModelRejected.model_validate(
                        {
                            "model": model,
                            "version": mversion,
                            "run_id": run_id,
                            "reason": "worse",
                            "actor": "workflow",
                            "policy": {"name": "default", "version": 1},
                            "evidence": {"test.accuracy": accuracy},
                        }
                    ),
                    cause=completed,
                )
        current = champion.get(model)
        if current:
            _data_plane(b, model, current[-1])
            if len(current) >= 2 and rng.random() < 0.1:
                alert = b.emit(
                    ServingAlert.model_validate(
                        {
                            "model": model,
                            "version": current[-1],
                            "alert": "error_rate",
                            "status": "firing",
                            "metric": "error_rate",
                            "value": 0.3,
                            "threshold": 0.05,
                            "windows": 3,
                            "window_end": b.clock,
                        }
                    )
                )
                back = current[-2]
                b.emit(
                    ModelPromoted.model_validate(
                        {
                            "model": model,
                            "version": back,
                            "previous_version": current[-1],
                            "reason": "rollback: error_rate",
                            "actor": "workflow",
                            "rollback": True,
                            "policy": {"name": "default", "version": 1},
                            "cause": alert.id,
                        }
                    ),
                    cause=alert,
                )
                current.append(back)
        if rng.random() < 0.03:
            b.garbage(
                rng.choice(["training.completed", "model.promoted", "dataset.created"]), model
            )
    return _shuffle(b.out, rng)


def _data_plane(b: _Builder, model: str, version: str) -> None:
    rid = f"req-{b.counter}"
    b.emit(
        InferenceRequest.model_validate(
            {
                "request_id": rid,
                "model": model,
                "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}],
            }
        )
    )
    b.emit(InferenceResult.model_validate({"request_id": rid, "model": model, "version": version}))
    b.emit(
        InferenceLogged.model_validate(
            {
                "request_id": rid,
                "model": model,
                "version": version,
                "replica": "r1",
                "latency_seconds": 0.01,
            }
        )
    )
    if b.rng.random() < 0.2:
        end = b.clock
        b.emit(
            ServingMetrics.model_validate(
                {
                    "model": model,
                    "version": version,
                    "window_start": end - timedelta(seconds=10),
                    "window_end": end,
                    "requests": 10,
                    "errors": 0,
                    "error_rate": 0.0,
                }
            )
        )
    if b.rng.random() < 0.02:
        b.emit(DeadLetter.model_validate(_deadletter_fields(b)))


def _deadletter_fields(b: _Builder) -> dict[str, Any]:
    return {
        "original": {
            "topic": "training.completed",
            "partition": 0,
            "offset": b.counter,
            "value_b64": "e25vdCBqc29u",
            "value_size": 9,
        },
        "reason": "value is not valid JSON",
        "error_type": "InvalidEvent",
    }


def _shuffle(records: list[GenRecord], rng: random.Random) -> list[GenRecord]:
    """Cross-topic interleaving shuffled (each record moves up to ~50 places, so a
    training.completed often precedes its training.started), plus ~2 % duplicate deliveries
    of the same record (same key, hence the same partition) a little later."""
    keyed = [(i + rng.uniform(0, 50), r) for i, r in enumerate(records)]
    for i, r in enumerate(records):
        if rng.random() < 0.02:
            keyed.append((i + rng.uniform(1, 200), r))
    keyed.sort(key=lambda x: x[0])
    return [r for _, r in keyed]


# -- into Kafka, or into memory as the archive would return it --------------------------------


def partition_for(record: GenRecord) -> int:
    """The partition the in-memory log puts a record in (by key, like Kafka: stable)."""
    partitions = TOPICS[record.topic].partitions
    return zlib.crc32(record.key or b"") % partitions


def as_log_records(records: Sequence[GenRecord]) -> list[LogRecord]:
    """The records as `LogRecord`s with partitions by key and consecutive offsets."""
    next_offset: dict[tuple[str, int], int] = {}
    out = []
    for r in records:
        p = partition_for(r)
        offset = next_offset.get((r.topic, p), 0)
        next_offset[(r.topic, p)] = offset + 1
        out.append(LogRecord(r.topic, p, offset, None, r.key, r.headers, r.value))
    return out


def produce(
    kafka: KafkaConfig, records: Sequence[GenRecord], timeout: float = 60.0
) -> dict[tuple[str, int], int]:
    """Produce every record in order (plain fast producer); {(topic, partition): next offset}
    of what was delivered, for waiting until a consumer has read it all."""
    producer = Producer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 1_000_000,
            "compression.type": "lz4",
        }
    )
    ends: dict[tuple[str, int], int] = {}
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
            return
        tp = (kafka.event_type(msg.topic()), msg.partition())
        ends[tp] = max(ends.get(tp, 0), msg.offset() + 1)

    for r in records:
        while True:
            try:
                producer.produce(
                    kafka.topic(r.topic),
                    r.value,
                    r.key,
                    headers=list(r.headers),
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(timeout)
    if remaining or errors:
        raise RuntimeError(f"{remaining} records not delivered; errors: {errors[:3]}")
    return ends


def lineage_topics_only(records: Sequence[GenRecord], topics: Sequence[str]) -> int:
    return sum(1 for r in records if r.topic in topics)


__all__ = [
    "DEADLETTER",
    "GenRecord",
    "as_log_records",
    "generate_log",
    "partition_for",
    "produce",
]
