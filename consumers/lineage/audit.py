"""Audit of one model version (`mlbus audit MODEL@VERSION`): every event of its lineage in
time order, each checked against the log (or the archive) — the record must still be there,
at the position the projection recorded, with the same sha256 of its value.

Audit of one request (`mlbus audit --request ID`): its `inference.logged` records (read
from the log: the data plane is not projected) name the version that answered and when;
the store adds the part that version played then (stable, a rollout's candidate, a shadow),
the rollout's changes up to that time with their weights, actors and reasons, and the
promotion behind it; those events and the version's lineage are verified as above.

Reads nothing through a consumer group: the caller passes the records (a group-less
`read_log` over Kafka, or the archive's reader), so nobody's offsets move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.entities import DatasetNode, Upstream
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.rollouts import RolloutQueries, Served
from mlbus.consumers.lineage.store import LineageStore, NotInLineage, iso, micros
from mlbus.errors import MlbusError
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.codec import decode_dict


@dataclass(frozen=True)
class AuditedEvent:
    event_id: str
    type: str
    topic: str
    partition: int
    offset: int
    time: str | None
    sha256: str
    status: str = "unchecked"  # verified, missing, changed, unchecked
    detail: str | None = None


@dataclass
class AuditReport:
    model: str
    version: str
    events: list[AuditedEvent] = field(default_factory=list)
    unknown_upstream: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.status == "verified" for e in self.events)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.status] = out.get(e.status, 0) + 1
        return out


def lineage_event_ids(up: Upstream) -> set[str]:
    """Ids of every event the projection used to answer `up`."""
    ids = {e.event_id for e in up.run.events}
    ids.update(d.provenance.event_id for d in up.decisions)
    ids.update(d.provenance.event_id for d in up.deployments)
    if up.provenance is not None:
        ids.add(up.provenance.event_id)
    stack = list(up.datasets)
    while stack:
        node = stack.pop()
        if node.provenance is not None:
            ids.add(node.provenance.event_id)
        stack.extend(node.parents)
    return ids


def unknown_datasets(up: Upstream) -> list[str]:
    out: list[str] = []
    stack: list[DatasetNode] = list(up.datasets)
    while stack:
        node = stack.pop()
        if not node.known:
            out.append(f"{node.name}@{node.version}")
        stack.extend(node.parents)
    return sorted(out)


def plan(store: LineageStore, model: str, version: str) -> AuditReport:
    """The events of `model@version`'s lineage, in time order, not yet checked."""
    up = LineageQueries(store).upstream(model, version)
    ids = lineage_event_ids(up)
    # the rollouts that brought it in: every change of its split as a candidate
    ids.update(
        c.provenance.event_id
        for c in RolloutQueries(store).changes(model)
        if c.candidate == version
    )
    return AuditReport(model, version, _planned(store, ids), unknown_datasets(up))


def _planned(store: LineageStore, wanted: Iterable[str]) -> list[AuditedEvent]:
    """The projected events of these ids, in time order, not yet checked."""
    ids = sorted(set(wanted))
    e = t.events
    rows: list[sa.Row[Any]] = []
    with store.reading("reading the audited events") as conn:
        for chunk in range(0, len(ids), 500):
            rows += conn.execute(sa.select(e).where(e.c.id.in_(ids[chunk : chunk + 500]))).all()
    rows.sort(key=lambda r: (r.time, r.topic, r.partition, r.offset))
    return [
        AuditedEvent(r.id, r.type, r.topic, r.partition, r.offset, iso(r.time), r.sha256)
        for r in rows
    ]


# -- one request ----------------------------------------------------------------------------------

#: Where a request's answers are recorded.
REQUEST_TOPICS = ("inference.logged",)


@dataclass
class Answer:
    """One `inference.logged` record of the request, and what the store says about it."""

    replica: str
    ok: bool
    status: int | None
    logged: AuditedEvent
    served: Served


@dataclass
class RequestAudit:
    request_id: str
    answers: list[Answer] = field(default_factory=list)
    report: AuditReport | None = None
    """the events the answers rest on (the logged records, the rollout's changes, the
    promotions and the answering version's lineage), verified by `verify`"""

    @property
    def ok(self) -> bool:
        return bool(self.answers) and self.report is not None and self.report.ok


def request_plan(
    store: LineageStore, request_id: str, logged: Iterable[LogRecord], model: str | None = None
) -> RequestAudit:
    """The answers to `request_id` found in `logged` (records of `inference.logged`; of
    `model` only if given) and the events they rest on, not yet checked."""
    queries = RolloutQueries(store)
    needle = request_id.encode()
    audit = RequestAudit(request_id)
    ids: set[str] = set()
    found: list[AuditedEvent] = []
    for record in logged:
        if record.topic != "inference.logged" or needle not in (record.value or b""):
            continue  # the id is in the value whichever the mode: a cheap filter
        try:
            event = decode_dict(record.value, record.headers or None, expected_type=record.topic)
        except MlbusError:
            continue
        d = event["data"]
        if d["request_id"] != request_id or (model is not None and d["model"] != model):
            continue
        at = event["time"] or datetime.fromtimestamp((record.timestamp_ms or 0) / 1000, UTC)
        shadow = bool(d.get("shadow"))
        served = queries.served(d["model"], d["version"], at, shadow=shadow)
        digest = hashlib.sha256(record.value or b"").hexdigest()
        when = iso(micros(at))
        mine = AuditedEvent(
            event["id"], event["type"], record.topic, record.partition, record.offset, when, digest
        )
        found.append(mine)
        audit.answers.append(Answer(d["replica"], d["ok"], d.get("status"), mine, served))
        ids.update(p.event_id for p in served.events)
        if not shadow:  # the answer the caller got: its version's lineage too
            try:
                up = LineageQueries(store).upstream(d["model"], d["version"], at)
            except NotInLineage:
                continue
            ids.update(lineage_event_ids(up))
    if audit.answers:
        first = audit.answers[0].served
        events = sorted(
            [*found, *_planned(store, ids)], key=lambda e: (e.time or "", e.topic, e.offset)
        )
        audit.report = AuditReport(first.model, first.version, events)
    return audit


def topics_of(report: AuditReport) -> list[str]:
    return sorted({e.topic for e in report.events})


def verify(report: AuditReport, records: Iterable[LogRecord]) -> AuditReport:
    """Check each planned event against `records` (the log or the archive): found at its
    recorded position with the same content hash, else at any position (reported), else
    missing."""
    by_position = {(e.topic, e.partition, e.offset): e for e in report.events}
    wanted = {e.event_id for e in report.events}
    topics = {e.topic for e in report.events}
    found_at: dict[tuple[str, int, int], str] = {}
    moved: dict[str, str] = {}
    for record in records:
        if record.topic not in topics:
            continue
        pos = (record.topic, record.partition, record.offset)
        if pos in by_position:
            found_at[pos] = hashlib.sha256(record.value or b"").hexdigest()
            continue
        # an event re-published elsewhere (a restored cluster has other offsets): only its id
        # is looked at here, the hash decides
        event_id = _event_id(record)
        if event_id in wanted and event_id not in moved:
            moved[event_id] = hashlib.sha256(record.value or b"").hexdigest()
    checked = []
    for e in report.events:
        digest = found_at.get((e.topic, e.partition, e.offset))
        if digest == e.sha256:
            checked.append(_with(e, "verified", None))
        elif e.event_id in moved and moved[e.event_id] == e.sha256:
            checked.append(_with(e, "verified", "found at another position, same content"))
        elif digest is not None or e.event_id in moved:
            checked.append(_with(e, "changed", "content hash differs from the projected event"))
        else:
            checked.append(_with(e, "missing", "not in the log read"))
    report.events = checked
    return report


def _with(e: AuditedEvent, status: str, detail: str | None) -> AuditedEvent:
    return AuditedEvent(
        e.event_id, e.type, e.topic, e.partition, e.offset, e.time, e.sha256, status, detail
    )


def _event_id(record: LogRecord) -> str | None:
    for key, value in record.headers:
        if key.lower() == "ce_id" and value is not None:  # CloudEvents binary mode
            return value.decode("utf-8", "replace")
    try:
        document = orjson.loads(record.value or b"")
    except orjson.JSONDecodeError:
        return None
    found = document.get("id") if isinstance(document, dict) else None
    return found if isinstance(found, str) else None
