"""Reading the archive back as the log it was (`mlbus replay --source archive`, `mlbus lineage
rebuild --source archive`, `mlbus archive restore`): `LogRecord`s in offset order per
partition, each offset once. Reads Parquet files only; no topic.

Speed: files are read with pyarrow in record batches; the time range and the de-duplication
are Arrow filters over whole batches, and columns become Python objects with one
`to_pylist()` each, so the only per-row Python is building the `LogRecord` itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlbus.consumers.archive.layout import NO_DATE, ArchiveFile, days_between, list_files
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.catalog import CATALOG
from mlbus.storage import ObjectStore, translated

BATCH_ROWS = 65_536
_COLUMNS = ["partition", "offset", "timestamp", "key", "headers", "value"]


def read_archive(
    store: ObjectStore,
    topics: Sequence[str] | None = None,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    log: str | None = None,
) -> Iterator[LogRecord]:
    """Every archived record of `topics` (contract names; None = every archived topic)
    with a timestamp in [`since_ms`, `until_ms`] (records without one are always included,
    as `read_log` does). Topic after topic (catalog order: datasets before training before
    models), partition after partition, in offset order within each partition; an offset
    archived twice (overlapping files of two archiver members) is yielded once. The current
    log of each partition, or with `log` the retired log of that id (layout.py)."""
    files = list_files(store, topics, log=log)
    order = {name: i for i, name in enumerate(topics or [s.name for s in CATALOG])}
    files.sort(key=lambda f: (order.get(f.topic, len(order)), f.topic, f.partition, f.first))
    lo_day, hi_day = days_between(since_ms, until_ms)
    for _, group in itertools.groupby(files, key=lambda f: (f.topic, f.partition)):
        emitted = -1  # the largest offset of this partition yielded (or filtered) so far
        for f in group:
            if f.last <= emitted:
                continue
            if f.day != NO_DATE and (
                (lo_day is not None and f.day < lo_day.isoformat())
                or (hi_day is not None and f.day > hi_day.isoformat())
            ):
                continue  # every record of a file lies on its date: none is in range
            yield from _read_file(store, f, emitted, since_ms, until_ms)
            emitted = f.last


def _read_file(
    store: ObjectStore, f: ArchiveFile, after: int, since_ms: int | None, until_ms: int | None
) -> Iterator[LogRecord]:
    key = f.key
    with translated(f"reading {store.uri(key)}"):
        if store.scheme == "file":
            source: str | pa.BufferReader = store.path(key)  # pyarrow's own IO: no copy
        else:  # one request for the whole object instead of a footer seek and ranges
            source = pa.BufferReader(store.read_bytes(key))
        parquet = pq.ParquetFile(source)
        batches = parquet.iter_batches(batch_size=BATCH_ROWS, columns=_COLUMNS)
    topic = f.topic
    while True:
        with translated(f"reading {store.uri(key)}"):
            batch = next(batches, None)
        if batch is None:
            return
        batch = _select(batch, after, since_ms, until_ms)
        if batch.num_rows:
            yield from _records(topic, batch)


def _select(
    batch: pa.RecordBatch, after: int, since_ms: int | None, until_ms: int | None
) -> pa.RecordBatch:
    mask = None
    if after >= 0:
        mask = pc.greater(batch.column("offset"), after)
    if since_ms is not None or until_ms is not None:
        stamps = batch.column("timestamp").cast(pa.int64())
        in_range = None
        if since_ms is not None:
            in_range = pc.greater_equal(stamps, since_ms)
        if until_ms is not None:
            upper = pc.less_equal(stamps, until_ms)
            in_range = upper if in_range is None else pc.and_(in_range, upper)
        assert in_range is not None
        in_range = pc.fill_null(in_range, True)  # no timestamp: kept, as read_log does
        mask = in_range if mask is None else pc.and_(mask, in_range)
    return batch if mask is None else batch.filter(mask)


def _records(topic: str, batch: pa.RecordBatch) -> Iterator[LogRecord]:
    headers = batch.column("headers")
    flat = headers.flatten()
    pairs = list(zip(flat.field("key").to_pylist(), flat.field("value").to_pylist(), strict=True))
    lengths = headers.value_lengths().fill_null(0).to_pylist()
    grouped = []
    at = 0
    for n in lengths:
        grouped.append(tuple(pairs[at : at + n]))
        at += n
    yield from map(
        LogRecord,
        itertools.repeat(topic),
        batch.column("partition").to_pylist(),
        batch.column("offset").to_pylist(),
        batch.column("timestamp").cast(pa.int64()).to_pylist(),
        batch.column("key").to_pylist(),
        grouped,
        batch.column("value").to_pylist(),
    )
