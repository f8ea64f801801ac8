"""Where and how the archive lies on the object store: one Parquet schema, one key per file,
and the listing that tells the archiver (high-water marks) and the reader (files in offset
order) what is there. Reads and writes no topic.

    archive/<topic>/date=YYYY-MM-DD/p<partition>-<first offset>-<last offset>.parquet
    archive/<topic>/log=<id>/date=YYYY-MM-DD/p<partition>-<first>-<last>.parquet   (retired)

`<topic>` is the contract's name (no deployment prefix), so an archive restores into any
cluster. A file holds consecutive records of one partition (`first`..`last`, both
inclusive) whose timestamps all fall on its UTC date; the name alone says which offsets a
file covers, so the archiver finds what is archived by listing, without opening a file.

The files directly under `<topic>/date=…` are the partition's *current* log: one log, never
two spliced. When the archiver finds a partition on a new log (mlbus/kafka/anchor.py: the
record at the offset of the last one archived is not that record any more) and is told to
go on (`positions.on_new_log` rebuild or restart), it first moves that partition's files
under `<topic>/log=<id>/` (`retire`), then archives the new log from its beginning. `<id>`
names the retired log: the first 16 hex digits of the anchor digest of its last archived
record, the same on every attempt, so a retirement cut short is finished by the next one.
Readers see the current log unless asked for a retired one (`list_files(..., log=id)`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

import orjson

from mlbus.storage import ObjectStore

if TYPE_CHECKING:
    import pyarrow as pa

ROOT = "archive"
#: The date directory of records without a timestamp (Kafka's CreateTime is optional).
NO_DATE = "none"


@functools.cache
def archive_schema() -> pa.Schema:
    """Columns of every archive file. `value` is the record's bytes unchanged (the CloudEvent
    JSON in structured mode); `event_id`/`event_type` are null when the record is not a
    decodable event (it is archived all the same: the archive keeps the log, not opinions).
    Built on first use: pyarrow loads with the first file written or read, so an idle
    archiver stays light."""
    import pyarrow as pa

    header = pa.struct([pa.field("key", pa.string()), pa.field("value", pa.binary())])
    return pa.schema(
        [
            pa.field("topic", pa.string(), nullable=False),
            pa.field("partition", pa.int32(), nullable=False),
            pa.field("offset", pa.int64(), nullable=False),
            pa.field("timestamp", pa.timestamp("ms", tz="UTC")),
            pa.field("key", pa.binary()),
            pa.field("headers", pa.list_(header)),
            pa.field("value", pa.binary()),
            pa.field("event_id", pa.string()),
            pa.field("event_type", pa.string()),
        ]
    )


_NAME = re.compile(
    r"^(?P<topic>[^/]+)/(?:log=(?P<log>[0-9a-z]+)/)?"
    r"date=(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2}|none)/"
    r"p(?P<partition>[0-9]+)-(?P<first>[0-9]+)-(?P<last>[0-9]+)\.parquet$"
)


@dataclass(frozen=True, order=True, slots=True)
class ArchiveFile:
    """One archive file, as its key describes it (ordering: by partition, then offsets)."""

    topic: str
    partition: int
    first: int
    last: int
    day: str  # YYYY-MM-DD, or NO_DATE
    log: str | None = None  # a retired log's id; None: the current log

    @property
    def key(self) -> str:
        return file_key(self.topic, self.day, self.partition, self.first, self.last, self.log)


def day_of(timestamp_ms: int | None) -> str:
    """The UTC date directory of a record's timestamp."""
    if timestamp_ms is None:
        return NO_DATE
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).date().isoformat()


def file_key(
    topic: str, day: str, partition: int, first: int, last: int, log: str | None = None
) -> str:
    # Zero-padded offsets: keys sort like offsets, for people listing a bucket.
    folder = f"{ROOT}/{topic}" if log is None else f"{ROOT}/{topic}/log={log}"
    return f"{folder}/date={day}/p{partition:04d}-{first:020d}-{last:020d}.parquet"


def parse_key(key: str) -> ArchiveFile | None:
    """The file a store key names, or None for anything else (foreign files are ignored)."""
    if not key.startswith(ROOT + "/"):
        return None
    match = _NAME.match(key[len(ROOT) + 1 :])
    if match is None:
        return None
    return ArchiveFile(
        topic=match["topic"],
        partition=int(match["partition"]),
        first=int(match["first"]),
        last=int(match["last"]),
        day=match["date"],
        log=match["log"],
    )


def list_files(
    store: ObjectStore, topics: Iterable[str] | None = None, *, log: str | None = None
) -> list[ArchiveFile]:
    """Every archive file of `topics` (all when None) in the current log, or in the retired
    log `log`, sorted by topic, partition, offsets.

    One recursive listing per topic: a file's key says everything needed, so nothing is
    opened. (S3 lists 1,000 keys per request; an archive flushed every minute is ~500k
    files a year per partition at most, listed once per assignment — acceptable, and a
    manifest can come later if it is not.)"""
    names = list(topics) if topics is not None else _topics(store)
    found: list[ArchiveFile] = []
    for topic in names:
        for key in store.list(f"{ROOT}/{topic}"):
            parsed = parse_key(key)
            if parsed is not None and parsed.topic == topic and parsed.log == log:
                found.append(parsed)
    return sorted(found)


def retired_logs(store: ObjectStore, topic: str) -> dict[str, list[ArchiveFile]]:
    """The retired logs of `topic` (see the module docstring): id → its files."""
    found: dict[str, list[ArchiveFile]] = {}
    for key in store.list(f"{ROOT}/{topic}"):
        parsed = parse_key(key)
        if parsed is not None and parsed.topic == topic and parsed.log is not None:
            found.setdefault(parsed.log, []).append(parsed)
    return {log: sorted(files) for log, files in sorted(found.items())}


def retire(store: ObjectStore, files: Sequence[ArchiveFile], log: str) -> None:
    """Move `files` (the current log's, of one partition) under the retired log `log`,
    oldest first: the newest file, whose last record names the log, goes last, so a
    retirement cut short is resumed under the same id."""
    for f in sorted(files, key=lambda f: (f.last, f.first)):
        store.move(f.key, file_key(f.topic, f.day, f.partition, f.first, f.last, log))


def _topics(store: ObjectStore) -> list[str]:
    return sorted(
        {f.topic for key in store.list(ROOT) if (f := parse_key(key)) is not None and not f.log}
    )


def high_water(files: Sequence[ArchiveFile]) -> dict[tuple[str, int], int]:
    """(topic, partition) → the next offset to archive (one past the last archived)."""
    out: dict[tuple[str, int], int] = {}
    for f in files:
        tp = (f.topic, f.partition)
        out[tp] = max(out.get(tp, 0), f.last + 1)
    return out


def days_between(since_ms: int | None, until_ms: int | None) -> tuple[date | None, date | None]:
    """The UTC dates a time range touches (None: open end), for pruning date directories."""
    lo = None if since_ms is None else datetime.fromtimestamp(since_ms / 1000, UTC).date()
    hi = None if until_ms is None else datetime.fromtimestamp(until_ms / 1000, UTC).date()
    return lo, hi


def archive_table(
    topics: Sequence[str],
    partitions: Sequence[int],
    offsets: Sequence[int],
    timestamps_ms: Sequence[int | None],
    keys: Sequence[bytes | None],
    headers: Sequence[Sequence[tuple[str, bytes | None]] | None],
    values: Sequence[bytes | None],
) -> pa.Table:
    """Records (column by column) as a table of the archive's columns (`archive_schema`)."""
    import pyarrow as pa

    schema = archive_schema()
    found = [identity(v, h) for v, h in zip(values, headers, strict=True)]
    return pa.table(
        {
            "topic": pa.array(topics, pa.string()),
            "partition": pa.array(partitions, pa.int32()),
            "offset": pa.array(offsets, pa.int64()),
            "timestamp": pa.array(timestamps_ms, pa.int64()).cast(schema.field("timestamp").type),
            "key": pa.array(keys, pa.binary()),
            "headers": pa.array(
                [[{"key": k, "value": v} for k, v in h] if h else [] for h in headers],
                schema.field("headers").type,
            ),
            "value": pa.array(values, pa.binary()),
            "event_id": pa.array([f[0] for f in found], pa.string()),
            "event_type": pa.array([f[1] for f in found], pa.string()),
        },
        schema=schema,
    )


def identity(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]] | None
) -> tuple[str | None, str | None]:
    """(event id, type) of a record if it carries a CloudEvent, structured or binary mode;
    (None, None) otherwise. Only these two attributes: validation is the consumers' job."""
    if headers:
        ce = {k: v for k, v in headers if k in ("ce_id", "ce_type") and v is not None}
        if "ce_id" in ce:
            return _text(ce["ce_id"]), _text(ce.get("ce_type"))
    if not value or value[:1] != b"{":
        return None, None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    event_id, event_type = parsed.get("id"), parsed.get("type")
    return (
        event_id if isinstance(event_id, str) else None,
        event_type if isinstance(event_type, str) else None,
    )


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
