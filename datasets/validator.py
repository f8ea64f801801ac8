"""The dataset validator: consumes `dataset.created` (from mlbus or any upstream system),
re-reads what the event points at — the Parquet footer and the sha256 of the bytes — checks
the version it announces, and publishes `dataset.validated` when everything matches. A
mismatch raises `InvalidEvent`, so the consumer loop dead-letters the announcement with the
reason; nothing is published downstream and the training trigger (which acts on
`dataset.validated`) never sees it.

A version is a token (letters, digits, '.', '_', '-'; 64 hex digits only if they are the
content hash's) naming one content forever: a `dataset.created` that re-announces a
validated name@version with another content hash is refused (the validator keeps a log view
of `dataset.validated`). An announcement without column statistics gets them computed here
from the bytes, in the same pass as the hash, and published in `dataset.validated`, so every
validated dataset has a drift baseline.

Exactly-once effect: the `dataset.validated` event id is derived from the `dataset.created`
id (uuid5), so a redelivered announcement re-publishes the same event, which consumers
drop as a duplicate by id.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from mlbus.datasets.formats import READ_BATCH_ROWS
from mlbus.errors import InvalidEvent
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Record
from mlbus.kafka.logview import LogIndex
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.datasets import ColumnStats, DatasetCreated, DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.settings import LimitsSettings
from mlbus.storage import ObjectStore, StorageError, translated
from mlbus.verified import object_identity

if TYPE_CHECKING:
    import pyarrow as pa

_NAMESPACE = uuid.UUID("6f1c7d1e-5a8b-4c55-9d52-0d3f1f7a9a11")
CHECKS = ["readable", "num_rows", "schema", "label_column", "content_hash", "version"]
VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9A-Fa-f]{64}$")


def validated_id(created_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, created_id))


def check_version(data: DatasetCreated) -> None:
    """Raise `InvalidEvent` if `version` is not a version token (docs/datasets.md)."""
    version = data.version
    if not VERSION.match(version):
        raise InvalidEvent(
            f"version: {version!r} is not a version: use 1 to 128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit (e.g. 2026-11-21, v7, or the content "
            "hash's 64 hex digits)"
        )
    if _HEX64.match(version) and f"sha256:{version}" != data.content_hash:
        raise InvalidEvent(
            f"version: {version} looks like a content id (64 hex digits) but is not the "
            f"content hash's digits ({data.content_hash}); use the content hash's digits or "
            "a version of your own that is not 64 hex digits"
        )


def check(
    store: ObjectStore, data: DatasetCreated, *, max_row_group_bytes: int | None = None
) -> dict[str, ColumnStats] | None:
    """Raise `InvalidEvent` naming the first thing that does not match the bytes. Returns
    the column statistics computed from the bytes when the event has none (else None)."""
    # pyarrow is loaded by the first dataset checked: an idle validator stays light.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlbus.tables import check_row_groups, sha256_of

    check_version(data)
    limit = max_row_group_bytes or LimitsSettings().max_row_group_bytes
    try:
        fs, path = store.resolve(data.uri)
    except StorageError as e:
        raise InvalidEvent(f"uri: {e}") from None
    try:
        with translated(f"reading {data.uri}"), fs.open(path, "rb") as handle:
            try:
                file = pq.ParquetFile(handle)
                metadata = file.metadata
            except (pa.ArrowInvalid, OSError) as e:
                raise InvalidEvent(f"uri: {data.uri} is not readable Parquet ({e})") from None
            schema = metadata.schema.to_arrow_schema()
            check_row_groups(file, f"uri: {data.uri}", limit, InvalidEvent)
    except StorageError as e:  # missing, forbidden...; an outage is a TransientError: retried
        raise InvalidEvent(f"uri: nothing readable at {data.uri} ({e})") from None
    if metadata.num_rows != data.num_rows:
        raise InvalidEvent(
            f"num_rows: the event says {data.num_rows}, the file has {metadata.num_rows}"
        )
    actual = [(f.name, _list_items(str(f.type))) for f in schema]
    claimed = [(c.name, _list_items(c.type)) for c in data.arrow_schema]
    if actual != claimed:
        present = set(schema.names)
        missing = [name for name, _ in claimed if name not in present]
        what = (
            f"column(s) {', '.join(map(repr, missing))} announced but not in the file; "
            if missing
            else ""
        )
        raise InvalidEvent(f"arrow_schema: {what}the event says {claimed}, the file has {actual}")
    if data.label_column is not None and data.label_column not in schema.names:
        raise InvalidEvent(
            f"label_column: {data.label_column!r} is announced but not a column of the file "
            f"(columns: {', '.join(schema.names)})"
        )
    if not data.columns:
        return _hash_with_stats(store, data, schema)
    with translated(f"hashing {data.uri}"):
        before = object_identity(fs, path) if store.verified is not None else None
        digest = sha256_of(fs, path)
    if digest != data.content_hash:
        raise InvalidEvent(
            f"content_hash: the event says {data.content_hash}, the bytes hash to {digest}"
        )
    if store.verified is not None:  # a later read of the same object need not hash it
        with translated(f"reading {data.uri}"):
            store.verified.record(fs, path, before, object_identity(fs, path), digest)
    return None


def _hash_with_stats(
    store: ObjectStore, data: DatasetCreated, schema: pa.Schema
) -> dict[str, ColumnStats]:
    """One verified streaming read: the hash is checked and the statistics computed."""
    import pyarrow as pa

    from mlbus.datasets.stats import StatsBuilder
    from mlbus.tables import DatasetReader, HashMismatch

    stats = StatsBuilder(schema)
    try:
        with DatasetReader(
            store, data.uri, data.content_hash, batch_size=READ_BATCH_ROWS
        ) as reader:
            for batch in reader:
                stats.add(batch)
                del batch  # one batch alive at a time
    except HashMismatch as e:
        raise InvalidEvent(f"content_hash: {e}") from None
    except StorageError as e:
        raise InvalidEvent(f"uri: {data.uri} could not be read ({e})") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise InvalidEvent(f"uri: {data.uri} is not readable Parquet ({e})") from None
    return stats.result()


def validated_versions(kafka: KafkaConfig) -> LogIndex[tuple[str, str]]:
    """The first `dataset.validated` of each (name, version): what a version names."""
    return LogIndex(
        kafka,
        "dataset.validated",
        lambda e: (e.data.name, e.data.version),
        name="validated versions",
    )


class Validator:
    """Handler for `dataset.created` (run it in a ConsumerLoop); `close()` it after."""

    def __init__(
        self,
        store: ObjectStore,
        producer: EventProducer,
        name: str = "validator",
        *,
        limits: LimitsSettings | None = None,
    ) -> None:
        self.store = store
        self.producer = producer
        self.name = name
        self.limits = limits or LimitsSettings()
        self.versions = validated_versions(producer.kafka)

    def close(self) -> None:
        self.versions.close()

    def _check_reannouncement(self, data: DatasetCreated) -> None:
        first = self.versions.get((data.name, data.version))
        if first is not None and first.data.content_hash != data.content_hash:
            raise InvalidEvent(
                f"version: {data.name}@{data.version} was validated with content hash "
                f"{first.data.content_hash} (dataset.validated {first.id}); a version names "
                f"one content forever: announce {data.content_hash} under a new version"
            )

    def __call__(self, event: Event[DatasetCreated], record: Record) -> None:
        data: DatasetCreated = event.data
        check_version(data)
        self._check_reannouncement(data)
        computed = check(self.store, data, max_row_group_bytes=self.limits.max_row_group_bytes)
        self.producer.publish(
            DatasetValidated(
                name=data.name,
                version=data.version,
                uri=data.uri,
                content_hash=data.content_hash,
                num_rows=data.num_rows,
                validator=self.name,
                checks=CHECKS,
                tags=data.tags,
                label_column=data.label_column,
                columns=computed if computed is not None else data.columns,
                stats_computed=computed is not None,
                arrow_schema=data.arrow_schema,
            ),
            causation=event,
            event_id=validated_id(event.id),
            subject=event.subject,
        )
        self.producer.flush()  # confirmed before the loop may commit the announcement


def _list_items(arrow_type: str) -> str:
    """A type as Arrow prints it, with a list's child named `item` as Arrow names it: the
    Parquet schema calls it `element`, so a list column (a tensor column) read back from the
    file prints `list<element: float>` for the announced `list<item: float>`."""
    return arrow_type.replace("<element: ", "<item: ")
