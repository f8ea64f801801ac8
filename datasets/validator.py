"""The dataset validator: consumes `dataset.created` (from mlbus or any upstream system),
re-reads what the event points at — the Parquet footer and the sha256 of the bytes — and
publishes `dataset.validated` when everything matches. A mismatch raises `InvalidEvent`,
so the consumer loop dead-letters the announcement with the reason; nothing is published
downstream and the training trigger (which acts on `dataset.validated`) never sees it.

Exactly-once effect: the `dataset.validated` event id is derived from the `dataset.created`
id (uuid5), so a redelivered announcement re-publishes the same event, which consumers
drop as a duplicate by id.
"""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from mlbus.errors import InvalidEvent
from mlbus.kafka.consumer import Record
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.datasets import DatasetCreated, DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.storage import ObjectStore, StorageError, translated
from mlbus.tables import sha256_of

_NAMESPACE = uuid.UUID("6f1c7d1e-5a8b-4c55-9d52-0d3f1f7a9a11")
CHECKS = ["readable", "num_rows", "schema", "label_column", "content_hash"]


def validated_id(created_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, created_id))


def check(store: ObjectStore, data: DatasetCreated) -> None:
    """Raise `InvalidEvent` naming the first thing that does not match the bytes."""
    try:
        fs, path = store.resolve(data.uri)
    except StorageError as e:
        raise InvalidEvent(f"uri: {e}") from None
    try:
        with translated(f"reading {data.uri}"), fs.open(path, "rb") as handle:
            try:
                metadata = pq.ParquetFile(handle).metadata
            except (pa.ArrowInvalid, OSError) as e:
                raise InvalidEvent(f"uri: {data.uri} is not readable Parquet ({e})") from None
            schema = metadata.schema.to_arrow_schema()
    except StorageError as e:  # missing, forbidden...; an outage is a TransientError: retried
        raise InvalidEvent(f"uri: nothing readable at {data.uri} ({e})") from None
    if metadata.num_rows != data.num_rows:
        raise InvalidEvent(
            f"num_rows: the event says {data.num_rows}, the file has {metadata.num_rows}"
        )
    actual = [(f.name, str(f.type)) for f in schema]
    claimed = [(c.name, c.type) for c in data.arrow_schema]
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
    with translated(f"hashing {data.uri}"):
        digest = sha256_of(fs, path)
    if digest != data.content_hash:
        raise InvalidEvent(
            f"content_hash: the event says {data.content_hash}, the bytes hash to {digest}"
        )


class Validator:
    """Handler for `dataset.created` (run it in a ConsumerLoop)."""

    def __init__(
        self, store: ObjectStore, producer: EventProducer, name: str = "validator"
    ) -> None:
        self.store = store
        self.producer = producer
        self.name = name

    def __call__(self, event: Event[DatasetCreated], record: Record) -> None:
        data: DatasetCreated = event.data
        check(self.store, data)
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
                arrow_schema=data.arrow_schema,
            ),
            causation=event,
            event_id=validated_id(event.id),
            subject=event.subject,
        )
        self.producer.flush()  # confirmed before the loop may commit the announcement
