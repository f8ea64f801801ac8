"""The projection core: log records in, lineage rows out, whatever the records come from
(the live Kafka consumer, an in-memory list, the archive).

Reads dataset.*, training.*, pipeline.defined, model.* (model.traffic: rollouts),
deployment.updated, serving.alert.
Exactly-once effect: each batch is one transaction holding its rows *and* the position of
every topic-partition it read; rows are inserted with ON CONFLICT DO NOTHING on the event id,
so a record delivered again (a crash before the commit, a duplicate publish) changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.store import LineageStore, micros
from mlbus.errors import MlbusError
from mlbus.kafka.anchor import record_digest
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.codec import DEFAULT_MAX_EVENT_BYTES, decode_dict
from mlbus.schemas.training import run_id_for

log = logging.getLogger("mlbus.consumers.lineage")

#: The topics the projection reads. Not read: `mlbus.deadletter` (its records are copies of
#: records of the other topics, which the projector already saw and counted as skipped;
#: projecting them again would count them twice), and the data plane (`inference.requests`,
#: `inference.results`, `inference.logged`, `serving.metrics`): millions of records a day
#: with short retention and no lineage fact that the model and deployment events do not
#: already state; which version served at a time is answered from promotions.
TOPICS: tuple[str, ...] = (
    "dataset.created",
    "dataset.validated",
    "training.requested",
    "training.started",
    "training.progress",
    "training.completed",
    "training.failed",
    "pipeline.defined",
    "model.promoted",
    "model.rejected",
    "model.traffic",
    "deployment.updated",
    "serving.alert",
)

DEFAULT_BATCH = 5000

Rows = dict[sa.Table, list[tuple]]
#: An event as `schemas.codec.decode_dict` gives it (defaults filled in, nested dicts).
Event = dict[str, Any]


@dataclass
class ProjectStats:
    records: int = 0
    projected: int = 0
    skipped: int = 0
    ignored: int = 0  # records of topics the projection does not read
    batches: int = 0

    def add(self, other: ProjectStats) -> None:
        self.records += other.records
        self.projected += other.projected
        self.skipped += other.skipped
        self.ignored += other.ignored
        self.batches += other.batches


def ds(name: str, version: str) -> str:
    return f"dataset:{name}@{version}"


def mv(model: str, version: str) -> str:
    return f"model:{model}@{version}"


def run_node(run_id: str) -> str:
    return f"run:{run_id}"


# -- one event → its rows ---------------------------------------------------------------------
# Each function appends tuples in the column order of its table (provenance first: event id,
# topic, partition, offset, time); `Projector` checks the widths once per table.


def _j(value: Any) -> str:
    """JSON columns: canonical text (sorted keys), so that a dump compares byte for byte."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _dataset_created(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    name, version, parents = d["name"], d["version"], d["parents"]
    rows[t.dataset_versions].append(
        (
            *p,
            name,
            version,
            d["uri"],
            d["content_hash"],
            d["num_rows"],
            d["num_bytes"],
            d["label_column"],
            _j(d["tags"]),
            _j([[x["name"], x["version"]] for x in parents]),
            d["description"],
            d["created_by"],
        )
    )
    for parent in parents:
        _edge(rows, p, "derived_from", ds(parent["name"], parent["version"]), ds(name, version))


def _dataset_validated(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    rows[t.dataset_validations].append(
        (*p, d["name"], d["version"], d["content_hash"], d["validator"], _j(d["checks"]))
    )


#: Fields of a request or a completion with columns of their own; the others go to `details`.
_REQUEST_COLUMNS = frozenset(
    ("model", "dataset", "family", "hyperparameters", "seed", "max_epochs", "requested_by",
     "pipeline")
)  # fmt: skip
_COMPLETION_COLUMNS = frozenset(
    ("run_id", "model", "version", "request_id", "family", "dataset", "metrics",
     "hyperparameters", "seed", "epochs", "code", "duration_seconds")
)  # fmt: skip


def _details(d: dict[str, Any], columns: frozenset[str]) -> str:
    return _j({k: v for k, v in d.items() if k not in columns})


def _training_requested(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    dataset, sweep = d["dataset"], d["sweep"]
    rows[t.training_requests].append(
        (
            *p,
            d["model"],
            dataset["name"],
            dataset["version"],
            d["family"],
            _j(d["hyperparameters"]),
            d["seed"],
            d["max_epochs"],
            d["requested_by"],
            d["pipeline"],
            sweep["sweep_id"] if sweep else None,
            e["correlationid"],
            run_id_for(p[0]),
            _details(d, _REQUEST_COLUMNS),
        )
    )


def _training_started(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    dataset, run_id = d["dataset"], d["run_id"]
    rows[t.training_runs].append(
        (
            *p,
            run_id,
            d["model"],
            d["request_id"],
            dataset["name"],
            dataset["version"],
            d["worker"],
            d["attempt"],
            d["resumed_from_epoch"],
        )
    )
    _edge(rows, p, "trained_on", ds(dataset["name"], dataset["version"]), run_node(run_id))


def _training_progress(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    rows[t.run_progress].append(
        (
            *p,
            d["run_id"],
            d["model"],
            d["epoch"],
            d["max_epochs"],
            _j(d["metrics"]),
            d["samples_per_second"],
        )
    )


def _training_completed(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    dataset, artifact, code = d["dataset"], d["artifact"], d["code"]
    model, version, run_id = d["model"], d["version"], d["run_id"]
    rows[t.model_versions].append(
        (
            *p,
            model,
            version,
            run_id,
            d["request_id"],
            d["family"],
            dataset["name"],
            dataset["version"],
            artifact["uri"],
            artifact["sha256"],
            _j(d["metrics"]),
            _j(d["hyperparameters"]),
            d["seed"],
            d["epochs"],
            code["package_version"],
            code["git_commit"],
            d["duration_seconds"],
            _details(d, _COMPLETION_COLUMNS),
        )
    )
    _edge(rows, p, "trained_on", ds(dataset["name"], dataset["version"]), run_node(run_id))
    _edge(rows, p, "produced", run_node(run_id), mv(model, version))


def _training_failed(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    rows[t.run_failures].append(
        (
            *p,
            d["run_id"],
            d["model"],
            d["request_id"],
            d["reason"],
            d["retryable"],
            d["error_type"],
            d["epoch"],
        )
    )


def _promoted(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    policy, run_id = d["policy"], d["run_id"]
    rows[t.decisions].append(
        (
            *p,
            "promoted",
            d["model"],
            d["version"],
            run_id,
            d["reason"],
            d["actor"],
            policy["name"] if policy else None,
            policy["version"] if policy else None,
            _j(d["evidence"]),
            d["rollback"],
            d["previous_version"],
            None,
            d["cause"],
        )
    )
    if run_id:
        _edge(rows, p, "produced", run_node(run_id), mv(d["model"], d["version"]))


def _rejected(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    policy = d["policy"]
    rows[t.decisions].append(
        (
            *p,
            "rejected",
            d["model"],
            d["version"],
            d["run_id"],
            d["reason"],
            d["actor"],
            policy["name"] if policy else None,
            policy["version"] if policy else None,
            _j(d["evidence"]),
            False,
            None,
            d["champion_version"],
            None,
        )
    )


def _traffic(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    policy = d["policy"]
    rows[t.rollouts].append(
        (
            *p,
            d["rollout_id"],
            d["model"],
            d["strategy"],
            d["status"],
            d["stable"],
            d["candidate"],
            _j(d["weights"]),
            d["shadow"],
            d["step"],
            _j(d["steps"]),
            _j(d["criteria"]),
            _j(d["analysis"]),
            d["reason"],
            d["actor"],
            policy["name"] if policy else None,
            policy["version"] if policy else None,
            d["run_id"],
            d["cause"],
        )
    )


def _deployment_updated(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    model, version, replica, status = d["model"], d["version"], d["replica"], d["status"]
    rows[t.deployments].append(
        (*p, model, version, replica, status, d["artifact_sha256"], d["error"])
    )
    if status == "loaded":
        _edge(rows, p, "deployed", mv(model, version), f"replica:{model}/{replica}")


def _pipeline_defined(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    rows[t.pipelines].append(
        (
            *p,
            d["name"],
            d["revision"],
            d["enabled"],
            d["dataset"],
            d["model"],
            d["family"],
            _j(d["policy"]),
            d["actor"],
        )
    )


def _serving_alert(e: Event, p: tuple, rows: Rows) -> None:
    d = e["data"]
    rows[t.alerts].append(
        (
            *p,
            d["model"],
            d["version"],
            d["alert"],
            d["status"],
            d["metric"],
            d["value"],
            d["threshold"],
        )
    )


def _edge(rows: Rows, p: tuple, relation: str, src: str, dst: str) -> None:
    rows[t.lineage_edges].append((*p, relation, src, dst))


PROJECTIONS: dict[str, Callable[[Event, tuple, Rows], None]] = {
    "dataset.created": _dataset_created,
    "dataset.validated": _dataset_validated,
    "training.requested": _training_requested,
    "training.started": _training_started,
    "training.progress": _training_progress,
    "training.completed": _training_completed,
    "training.failed": _training_failed,
    "pipeline.defined": _pipeline_defined,
    "model.promoted": _promoted,
    "model.rejected": _rejected,
    "model.traffic": _traffic,
    "deployment.updated": _deployment_updated,
    "serving.alert": _serving_alert,
}
assert set(PROJECTIONS) == set(TOPICS)


# -- the projector ------------------------------------------------------------------------------


class Projector:
    """Projects batches of `LogRecord`s into a `LineageStore` (see the module docstring)."""

    def __init__(
        self,
        store: LineageStore,
        *,
        topics: Iterable[str] = TOPICS,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        self.store = store
        self.topics = frozenset(topics)
        self.max_event_bytes = max_event_bytes
        self._statements = {table: _insert_sql(table, store) for table in t.PROJECTED}
        # a staging store on PostgreSQL: COPY into its heaps (see `LineageStore`)
        self._copy = store.heaps
        self._widths = {table: len(table.columns) for table in t.PROJECTED}
        self._positions_sql = _positions_sql(store)

    def project(
        self, records: Iterable[LogRecord], batch_size: int = DEFAULT_BATCH
    ) -> ProjectStats:
        """Project every record, one transaction per batch of `batch_size` records."""
        total = ProjectStats()
        for batch in batches(records, batch_size):
            total.add(self.project_batch(batch))
        return total

    def project_batch(self, records: list[LogRecord]) -> ProjectStats:
        """One transaction: the rows of `records` and the positions after them."""
        rows, positions, stats = self.prepare(records)
        with self.store.transaction("projecting a batch of the log") as conn:
            self.write(conn, rows, positions)
        return stats

    def prepare(self, records: list[LogRecord]) -> tuple[Rows, list[tuple], ProjectStats]:
        """The rows of `records` by table, the positions after them, and their counts."""
        rows: Rows = {table: [] for table in t.PROJECTED}
        events, skipped = rows[t.events], rows[t.skipped]
        topics, max_bytes, sha256 = self.topics, self.max_event_bytes, hashlib.sha256
        seen: set[str] = set()
        lasts: dict[tuple[str, int], LogRecord] = {}  # each partition's last record
        ignored = 0
        # The per-record work is written out in this one loop: at a rebuild's rate each
        # attribute lookup and call here is a measurable share of the projection. Events are
        # decoded into dicts (`decode_dict`: the same validation, no model instances built;
        # docs/lineage.md).
        for record in records:
            topic = record.topic
            if topic not in topics:
                ignored += 1
                continue
            partition, offset = record.partition, record.offset
            tp = (topic, partition)
            last = lasts.get(tp)
            if last is None or last.offset <= offset:
                lasts[tp] = record
            value = record.value
            try:
                event = decode_dict(
                    value, record.headers or None, expected_type=topic, max_bytes=max_bytes
                )
            except MlbusError as e:
                skipped.append((topic, partition, offset, str(e)[:1000]))
                continue
            event_id = event["id"]
            if event_id in seen:
                continue  # a duplicate in this batch: the first copy is the one projected
            seen.add(event_id)
            time = event["time"]
            when = micros(time) if time is not None else (record.timestamp_ms or 0) * 1000
            key = record.key
            events.append(
                (
                    event_id,
                    event["type"],
                    topic,
                    partition,
                    offset,
                    when,
                    record.timestamp_ms,
                    key.decode("utf-8", "replace") if key is not None else None,
                    event["subject"],
                    event["source"],
                    event["correlationid"],
                    event["causationid"],
                    sha256(value or b"").hexdigest(),
                )
            )
            PROJECTIONS[topic](event, (event_id, topic, partition, offset, when), rows)
        # the position after each partition's last record, anchored by that record
        positions = [
            (
                r.topic,
                r.partition,
                r.offset + 1,
                r.offset,
                record_digest(r.key, r.value, r.timestamp_ms),
            )
            for r in lasts.values()
        ]
        stats = ProjectStats(
            records=len(records),
            projected=len(seen),
            skipped=len(skipped),
            ignored=ignored,
            batches=1,
        )
        return rows, positions, stats

    def write(self, conn: Connection, rows: Rows, positions: list[tuple]) -> None:
        """`prepare`'s rows and positions, in `conn`'s transaction."""
        # Straight to the driver's executemany (or COPY, into a staging store's heaps) with
        # tuples built in column order: SQLAlchemy's per-row parameter processing costs more
        # than SQLite's inserts themselves.
        cursor = conn.connection.driver_connection.cursor() if self._copy else None  # type: ignore[union-attr]  # a checked-out connection has its driver's
        for table, batch in rows.items():
            if batch:
                if len(batch[0]) != self._widths[table]:  # a projection out of step
                    raise AssertionError(f"{table.name}: rows of {len(batch[0])} columns")
                if cursor is not None:
                    with cursor.copy(self._statements[table]) as copy:
                        for row in batch:
                            copy.write_row(row)
                else:
                    conn.exec_driver_sql(self._statements[table], batch)
        if positions:
            conn.exec_driver_sql(self._positions_sql, positions)


def _insert_sql(table: sa.Table, store: LineageStore) -> str:
    names = ", ".join(f'"{c.name}"' for c in table.columns)
    if store.heaps:  # keyed and deduplicated at the swap
        return f"COPY {store.heap(table)} ({names}) FROM STDIN"
    marker = "%s" if store.backend == "postgresql" else "?"
    values = ", ".join(marker for _ in table.columns)
    return (
        f"INSERT INTO {store.qualified(table)} ({names}) VALUES ({values}) ON CONFLICT DO NOTHING"
    )


def _positions_sql(store: LineageStore) -> str:
    # never backwards: a batch read before a rebalance may commit after the partition's new
    # owner did; the anchor moves with the position (the anchor of the position kept)
    marker, greatest = ("%s", "GREATEST") if store.backend == "postgresql" else ("?", "MAX")
    name = store.qualified(t.positions)
    newer = f'excluded."next_offset" >= {name}."next_offset"'
    return (
        f'INSERT INTO {name} ("topic", "partition", "next_offset", "anchor_offset", '
        f'"anchor_digest") VALUES ({", ".join([marker] * 5)}) '
        f'ON CONFLICT ("topic", "partition") DO UPDATE SET '
        f'"next_offset" = {greatest}({name}."next_offset", excluded."next_offset"), '
        f'"anchor_offset" = CASE WHEN {newer} THEN excluded."anchor_offset" '
        f'ELSE {name}."anchor_offset" END, '
        f'"anchor_digest" = CASE WHEN {newer} THEN excluded."anchor_digest" '
        f'ELSE {name}."anchor_digest" END'
    )


def batches(records: Iterable[LogRecord], size: int) -> Iterator[list[LogRecord]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch
