"""The canonical writer: the bytes (and so the version id) depend on the rows only, not on
how the input was chunked or which format it came in; the hash is the sha256 of exactly the
bytes written; statistics come along in the same pass."""

from __future__ import annotations

import hashlib
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from mlbus.datasets.sources import InvalidDataset, open_source
from mlbus.datasets.writer import ROW_GROUP_ROWS, Written, canonical_batches, write_canonical

ROWS = ROW_GROUP_ROWS * 2 + 1234  # three row groups, the last one short


def data(rows: int = ROWS, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "x": pa.array(rng.integers(0, 1000, rows) / 4),  # exact in CSV text too
            "label": pa.array(rng.integers(0, 10, rows)),
        }
    )


def write(table: pa.Table, batch_rows: int | None) -> tuple[Written, bytes]:
    sink = io.BytesIO()
    batches = iter(table.to_batches(batch_rows)) if batch_rows else iter(table.to_batches())
    written = write_canonical(table.schema, batches, sink)
    return written, sink.getvalue()


def test_the_hash_is_the_sha256_of_the_bytes_written() -> None:
    written, raw = write(data(), None)
    assert written.content_hash == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert written.num_bytes == len(raw)
    assert written.num_rows == ROWS
    assert pq.read_table(io.BytesIO(raw)).equals(data())


def test_the_hash_does_not_depend_on_how_the_input_is_chunked() -> None:
    table = data()
    results = {n: write(table, n) for n in (None, 97, 65_536, ROW_GROUP_ROWS, 200_000)}
    hashes = {n: w.content_hash for n, (w, _) in results.items()}
    assert len(set(hashes.values())) == 1, hashes
    # ... and neither do the statistics that go into the event.
    stats = [w.columns for w, _ in results.values()]
    assert all(s == stats[0] for s in stats)


def test_uneven_chunks_across_row_group_boundaries_give_the_same_bytes() -> None:
    table = data()
    sizes = [7, ROW_GROUP_ROWS - 3, 5, ROW_GROUP_ROWS + 11, 1]
    offsets = np.cumsum([0, *sizes])
    chunks = [table.slice(a, b - a) for a, b in itertools.pairwise(offsets)]
    chunks.append(table.slice(int(offsets[-1])))
    uneven = pa.concat_tables(chunks)  # same rows, chunk boundaries in odd places
    assert uneven.column("id").num_chunks > 3
    a, raw_a = write(uneven, None)
    b, raw_b = write(table, None)
    assert raw_a == raw_b and a.content_hash == b.content_hash


def test_row_groups_are_cut_at_fixed_sizes() -> None:
    _, raw = write(data(), 1000)
    metadata = pq.ParquetFile(io.BytesIO(raw)).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 1234]


def test_different_data_has_a_different_hash() -> None:
    base, _ = write(data(), None)
    changed = data()
    x = changed.column("x").to_numpy().copy()
    x[ROWS // 2] += 0.25
    changed = changed.set_column(1, "x", pa.array(x))
    fewer = data().slice(0, ROWS - 1)
    reordered = data().select(["x", "id", "label"])
    renamed = data().rename_columns(["id", "x", "target"])
    retyped = data().cast(
        pa.schema([("id", pa.int32()), ("x", pa.float64()), ("label", pa.int64())])
    )
    hashes = {base.content_hash}
    for other in (changed, fewer, reordered, renamed, retyped):
        written, _ = write(other, None)
        assert written.content_hash not in hashes
        hashes.add(written.content_hash)


def test_the_same_rows_from_csv_and_from_parquet_are_the_same_version(tmp_path: Path) -> None:
    table = data(5000)
    pcsv.write_csv(table, tmp_path / "d.csv")
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=777, compression="gzip")
    hashes = set()
    for name in ("d.csv", "d.parquet"):
        source = open_source(tmp_path / name)
        hashes.add(write_canonical(source.schema, source.batches, io.BytesIO()).content_hash)
    assert len(hashes) == 1


def test_statistics_come_with_the_bytes() -> None:
    written, _ = write(data(), 50_000)
    assert set(written.columns) == {"id", "x", "label"}
    ids = written.columns["id"]
    assert (ids.min, ids.max, ids.null_count) == (0, ROWS - 1, 0)
    assert sum(ids.histogram.counts) == ROWS  # type: ignore[union-attr]


def test_no_rows_is_refused() -> None:
    empty = data(0)
    with pytest.raises(InvalidDataset, match="no rows"):
        write_canonical(empty.schema, iter(empty.to_batches()), io.BytesIO())


def test_a_batch_that_does_not_match_the_schema_is_refused() -> None:
    schema = pa.schema([("x", pa.int64())])
    batches = iter([pa.record_batch({"x": pa.array(["not a number"])})])
    with pytest.raises(InvalidDataset, match="does not match the schema"):
        write_canonical(schema, batches, io.BytesIO())


def test_progress_is_reported_per_row_group() -> None:
    seen: list[tuple[int, int]] = []
    write_canonical(
        data().schema,
        iter(data().to_batches(10_000)),
        io.BytesIO(),
        progress=lambda rows, written: seen.append((rows, written)),
    )
    assert [rows for rows, _ in seen] == [ROW_GROUP_ROWS, 2 * ROW_GROUP_ROWS, ROWS]
    assert all(b > a for (_, a), (_, b) in itertools.pairwise(seen))


def test_canonical_batches_recut_exactly() -> None:
    table = pa.table({"x": np.arange(25)})
    out = list(canonical_batches(iter(table.to_batches(7)), 10))
    assert [b.num_rows for b in out] == [10, 10, 5]
    assert pa.Table.from_batches(out).equals(table)


def test_a_multi_row_group_file_is_registered_one_batch_at_a_time(tmp_path: Path) -> None:
    """Registering from Parquet decodes a row group only once the previous one is released:
    when the writer asks for the next batch, none of the last one is allocated any more."""
    table = data(ROW_GROUP_ROWS * 4)
    path = tmp_path / "four-groups.parquet"
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
    assert pq.ParquetFile(path).num_row_groups == 4
    source = open_source(path)
    pool = pa.default_memory_pool()
    held: list[int] = []
    sizes: list[int] = []

    def watched(batches: Any) -> Any:
        base = pool.bytes_allocated()
        for batch in batches:
            sizes.append(batch.nbytes)
            yield batch
            del batch
            held.append(pool.bytes_allocated() - base)  # the writer asks for the next one

    written = write_canonical(source.schema, watched(source.batches), io.BytesIO())

    assert len(sizes) == 4 and written.num_rows == table.num_rows
    assert max(held) < 0.25 * max(sizes), (
        f"{max(held) / 1e6:.1f} MB still allocated when the next batch is read "
        f"(a batch is {max(sizes) / 1e6:.1f} MB)"
    )
    # The same version as the same rows from memory.
    assert written.content_hash == write(table, None)[0].content_hash
