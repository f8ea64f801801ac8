"""Registering dataset versions and finding them again.

A version is the sha256 of its canonical Parquet bytes (datasets/writer.py), stored under
`datasets/<name>/<version>/data.parquet` on the object store. Registration writes to a
staging key, commits only once the bytes are complete, and then publishes `dataset.created`;
if publishing fails the committed object is removed again, so a failed registration leaves
nothing behind and announces nothing. Registering data that is already a version of the
dataset publishes nothing and says so.

Which versions exist is read from the log (`dataset.created`, through a log view), not from
the object store: the event, not the file, is what makes a version visible.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlbus.datasets.formats import InvalidDataset
from mlbus.errors import UnknownDataset
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import dataset_versions
from mlbus.kafka.producer import EventProducer
from mlbus.refs import parse, resolve
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.datasets import ColumnSchema, DatasetCreated
from mlbus.schemas.envelope import Event
from mlbus.storage import ObjectStore

if TYPE_CHECKING:
    from mlbus.datasets.sources import Source

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SOURCE = "mlbus/datasets"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    uri: str
    content_hash: str
    num_rows: int
    num_bytes: int
    created: bool
    event_id: str | None = None
    payload: DatasetCreated | None = field(default=None, compare=False)

    @classmethod
    def of(cls, data: DatasetCreated, *, created: bool, event_id: str | None) -> Registered:
        return cls(
            data.name,
            data.version,
            data.uri,
            data.content_hash,
            data.num_rows,
            data.num_bytes,
            created=created,
            event_id=event_id,
            payload=data,
        )


def object_key(name: str, version: str) -> str:
    return f"datasets/{name}/{version}/data.parquet"


class DatasetRegistry:
    """Registers versions and finds them from a log view of `dataset.created`, kept open
    between calls (each lookup reads only what was announced since): `close()` it, or use
    it as a context manager."""

    def __init__(self, store: ObjectStore, kafka: KafkaConfig, *, source: str = SOURCE) -> None:
        self.store = store
        self.kafka = kafka
        self.source = source
        self._known = dataset_versions(kafka)

    def close(self) -> None:
        self._known.close()

    def __enter__(self) -> DatasetRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registering ------------------------------------------------------------------------

    def register_path(self, path: str | Path, *, name: str, **options: Any) -> Registered:
        """Register a local file or a URI inside the store or an allowed root."""
        from mlbus.datasets.sources import open_source  # pyarrow: only when registering

        fs, resolved = self.store.resolve(str(path))
        return self.register(open_source(resolved, fs), name=name, **options)

    def register(
        self,
        source: Source,
        *,
        name: str,
        label: str | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
        parents: Sequence[str] = (),
        created_by: str | None = None,
        progress: Progress | None = None,
    ) -> Registered:
        from mlbus.datasets.writer import write_canonical  # pyarrow: only when registering

        if not _NAME.match(name):
            raise InvalidDataset(
                f"dataset name {name!r}: use letters, digits, '.', '_' or '-' (at most 128)"
            )
        if label is not None and label not in source.schema.names:
            raise InvalidDataset(
                f"label column {label!r} is not in the data "
                f"(columns: {', '.join(source.schema.names)})"
            )
        known = self.versions()
        parent_refs = [self._resolve_parent(p, known) for p in parents]
        # Created first: an idempotent producer's initialisation (slow on the embedded
        # broker) overlaps the write instead of following it.
        with EventProducer(self.kafka, source=self.source) as producer:
            with self.store.staged() as staged:
                written = write_canonical(source.schema, source.batches, staged, progress=progress)
                version = written.content_hash.removeprefix("sha256:")
                key = object_key(name, version)
                existing = next(
                    (e for e in known if e.data.name == name and e.data.version == version), None
                )
                if existing is not None:
                    staged.abandon()
                    return Registered.of(existing.data, created=False, event_id=existing.id)
                staged.set_key(key)
            payload = DatasetCreated(
                name=name,
                version=version,
                uri=self.store.uri(key),
                content_hash=written.content_hash,
                arrow_schema=[
                    ColumnSchema(name=f.name, type=str(f.type), nullable=f.nullable)
                    for f in written.schema
                ],
                num_rows=written.num_rows,
                num_bytes=written.num_bytes,
                columns=written.columns,
                label_column=label,
                tags=dict(tags or {}),
                description=description,
                parents=parent_refs,
                created_by=created_by,
            )
            # The data stays even if the announcement fails: a record the broker took just
            # before it died may be confirmed to nobody and still be in the log (restored
            # from the journal), and an announced version without its data is broken for
            # good, while an unannounced file is only disk (registering again reuses it).
            ref = producer.publish(payload, subject=f"{payload.name}@sha256:{payload.version}")
            producer.flush()
            return Registered.of(payload, created=True, event_id=ref.id)

    def _resolve_parent(self, text: str, known: list[Event]) -> DatasetRef:
        ref = parse(text, what="DATASET")
        if ref.version is None:
            raise InvalidDataset(f"parent {text!r}: give NAME@VERSION")
        event = self._pick(ref.name, ref.version, known)
        return DatasetRef(name=event.data.name, version=event.data.version)

    # -- finding ----------------------------------------------------------------------------

    def versions(self, name: str | None = None) -> list[Event]:
        """Every `dataset.created` in the log now (of `name`), oldest first, one per version."""
        found = [e for e in self._known.events() if name is None or e.data.name == name]
        return sorted(found, key=lambda e: (e.time is None, e.time))

    def get(self, text: str) -> Event:
        """`name` (the newest version) or `name@version` (a unique prefix will do)."""
        ref = parse(text, what="DATASET")
        return self._pick(ref.name, ref.version, self.versions(ref.name))

    def _pick(self, name: str, version: str | None, known: Iterable[Event]) -> Event:
        candidates = [e for e in known if e.data.name == name]
        if not candidates:
            raise UnknownDataset(f"no dataset named {name!r}")
        if version is None:
            return candidates[-1]
        versions = [e.data.version for e in candidates]
        full = resolve(name, version, versions, kind="dataset", error=UnknownDataset)
        return next(e for e in candidates if e.data.version == full)
