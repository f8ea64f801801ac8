"""The canonical writer: turns a stream of record batches into the Parquet bytes of a
dataset version, hashing them as they are written and computing column statistics on the
way, in one pass with memory bounded by a batch.

Canonical means the bytes depend only on the rows and the writer's fixed settings, not on
how the input was chunked: rows are re-cut into row groups of exactly ROW_GROUP_ROWS, so the
same data registered twice (from the same file, or a different chunking of it) has the same
sha256, which is its version id.

Dictionary pages are capped at 128 KiB: a column with more distinct values than that per row
group falls back to plain encoding early. With pyarrow's 1 MiB default, the dictionary memo
of one high-cardinality float64 column of a row group alone took 32 MB (more than a whole
row group of a 27-column table), and the half-dictionary-encoded chunk was larger on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mlbus.datasets.sources import READ_BATCH_ROWS, InvalidDataset
from mlbus.datasets.stats import StatsBuilder
from mlbus.schemas.datasets import ColumnStats

ROW_GROUP_ROWS = READ_BATCH_ROWS
WRITER_OPTIONS = dict(
    compression="snappy",
    version="2.6",
    use_dictionary=True,
    write_statistics=True,
    data_page_size=1 << 20,
    dictionary_pagesize_limit=128 * 1024,
)


class HashingSink:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.written = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.written += view.nbytes
        self.target.write(view)
        return view.nbytes

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.written

    def close(self) -> None:
        self.closed = True  # the staging area closes the real target

    @property
    def content_hash(self) -> str:
        return "sha256:" + self.digest.hexdigest()


@dataclass
class Written:
    content_hash: str
    num_rows: int
    num_bytes: int
    schema: pa.Schema
    columns: dict[str, ColumnStats]


def canonical_batches(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream into batches of exactly `rows` rows (the last one shorter).

    No reference to a batch outlives its use: the next input batch is read (decoded, for a
    Parquet source) only after the previous one and every slice of it are released, so at
    most one input batch and one output batch are alive at once."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - held, batch.num_rows)
            pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == rows:
                out = _combine(pending)
                pending, held = [], 0
                yield out
                del out
        del batch  # an empty slice still holds its parent's buffers
    if held:
        yield _combine(pending)


def _combine(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def write_canonical(
    schema: pa.Schema,
    batches: Iterator[pa.RecordBatch],
    target: Any,
    *,
    progress: Any = None,
) -> Written:
    """Write `batches` to the binary file object `target`; returns hash, size and stats."""
    sink = HashingSink(target)
    stats = StatsBuilder(schema)
    rows = 0
    writer = pq.ParquetWriter(sink, schema, **WRITER_OPTIONS)
    try:
        for batch in canonical_batches(batches, ROW_GROUP_ROWS):
            if batch.schema != schema:
                try:
                    batch = batch.cast(schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise InvalidDataset(f"a batch does not match the schema: {e}") from None
            stats.add(batch)
            writer.write_batch(batch, row_group_size=ROW_GROUP_ROWS)
            rows += batch.num_rows
            if progress is not None:
                progress(rows, sink.written)
            del batch  # released before the next one is cut (and read)
    finally:
        writer.close()
    if rows == 0:
        raise InvalidDataset("the dataset has no rows")
    return Written(sink.content_hash, rows, sink.written, schema, stats.result())
