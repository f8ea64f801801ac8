"""Inputs a dataset can be registered from (Parquet, CSV, .npz, a table), read as a stream of
record batches; bad input is one `InvalidDataset` that names the problem."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from mlbus.datasets.sources import InvalidDataset, from_table, npz_table, open_source, open_stream
from mlbus.datasets.writer import write_canonical
from tests.mlbus.storage_support import PYTHON, run_measured, write_csv_file, write_parquet_file


def consume(path: Path, **options: object) -> pa.Table:
    """Open `path` and read every batch (errors in later batches surface only then)."""
    source = open_source(path, **options)  # type: ignore[arg-type]
    return pa.Table.from_batches(list(source.batches), schema=source.schema)


def register_bytes(path: Path) -> None:
    """What registration does with a source: every batch through the canonical writer."""
    source = open_source(path)
    write_canonical(source.schema, source.batches, io.BytesIO())


# -- the formats ------------------------------------------------------------------------------


def test_csv_types_are_inferred(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("id,score,name\n1,0.5,a\n2,1.5,b\n3,,c\n")
    source = open_source(path)
    assert source.size == path.stat().st_size
    assert [(f.name, str(f.type)) for f in source.schema] == [
        ("id", "int64"),
        ("score", "double"),
        ("name", "string"),
    ]
    data = pa.Table.from_batches(list(source.batches))
    assert data.column("score").to_pylist() == [0.5, 1.5, None]


def test_parquet_is_streamed_batch_by_batch(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table = pa.table({"x": np.arange(200_000), "y": np.arange(200_000) * 0.5})
    pq.write_table(table, path, row_group_size=50_000)
    source = open_source(path)
    batches = list(source.batches)
    assert len(batches) > 1 and max(b.num_rows for b in batches) < table.num_rows
    assert pa.Table.from_batches(batches).equals(table)


def test_npz_x_and_y_become_feature_columns_and_a_label(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(path, X=x, y=np.array([0, 1, 1, 0]))
    data = consume(path)
    assert data.schema.names == ["f0", "f1", "f2", "label"]
    assert data.column("f2").to_pylist() == [2.0, 5.0, 8.0, 11.0]
    assert data.column("label").to_pylist() == [0, 1, 1, 0]
    assert data.schema.field("f0").type == pa.float32()


def test_npz_named_one_dimensional_arrays_keep_their_names() -> None:
    data = npz_table({"age": np.array([1, 2]), "height": np.array([1.5, 1.6])})
    assert data.schema.names == ["age", "height"]


def test_format_can_be_given_when_the_suffix_does_not_say(tmp_path: Path) -> None:
    path = tmp_path / "export.data"
    path.write_text("a,b\n1,2\n")
    assert consume(path, format="csv").num_rows == 1


def test_an_open_stream_reads_like_a_file(tmp_path: Path) -> None:
    raw = b"a,b\n1,2\n3,4\n"
    source = open_stream(io.BytesIO(raw), len(raw), "upload.csv", "csv")
    assert pa.Table.from_batches(list(source.batches)).num_rows == 2


def test_a_table_source_batches_the_table() -> None:
    table = pa.table({"x": np.arange(10)})
    source = from_table(table, "t")
    assert source.schema == table.schema
    assert pa.Table.from_batches(list(source.batches)).equals(table)


# -- bad input --------------------------------------------------------------------------------


def test_a_csv_column_with_numbers_and_text_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "mixed.csv"
    # ("n/a", "NA", "null" and the empty string are read as nulls, not as text)
    path.write_text("id,amount,city\n1,10,Oslo\n2,ten,Rome\n3,30,Lima\n4,40,Kiev\n")
    with pytest.raises(InvalidDataset) as refused:
        register_bytes(path)
    message = str(refused.value)
    assert "'amount'" in message and "mixed types" in message
    assert "ten" in message
    assert str(path) in message


def test_a_csv_value_of_another_type_after_the_first_block_is_refused_by_name(
    tmp_path: Path,
) -> None:
    """Types are inferred from the first block of the file; a text value further down (here
    after 20 MiB) must still be refused, and the message must name the column as users
    know it — by its header, not by a position."""
    path = tmp_path / "late.csv"
    rows = 1_500_000
    numbers = pa.array(np.arange(10**12, 10**12 + rows))
    pcsv.write_csv(pa.table({"row_id": numbers, "reading": numbers}), path)
    with path.open("a") as handle:
        handle.write("1,broken-sensor\n")
    assert path.stat().st_size > 20 * 2**20
    with pytest.raises(InvalidDataset) as refused:
        register_bytes(path)
    message = str(refused.value)
    assert "broken-sensor" in message
    assert "'reading'" in message, f"the column is not named: {message}"


def test_a_ragged_csv_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(InvalidDataset, match="Expected 2 columns"):
        register_bytes(path)


@pytest.mark.parametrize("name", ["empty.csv", "empty.parquet", "empty.npz"])
def test_an_empty_file_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(InvalidDataset, match="empty"):
        open_source(path)


def test_an_empty_upload_is_refused() -> None:
    with pytest.raises(InvalidDataset, match="empty"):
        open_stream(io.BytesIO(b""), 0, "upload.csv", "csv")


def test_a_csv_with_a_header_and_no_rows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b\n")
    with pytest.raises(InvalidDataset, match="no rows"):
        register_bytes(path)


@pytest.mark.parametrize(
    "content",
    [b"name,value\nx,1\n", b"PAR1" + b"\0" * 100, b"\x89PNG\r\n\x1a\n" + bytes(range(256))],
    ids=["csv-text", "magic-only", "png"],
)
def test_bytes_that_are_not_parquet_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.parquet"
    path.write_bytes(content)
    with pytest.raises(InvalidDataset, match="not a Parquet file"):
        open_source(path)


def test_a_truncated_parquet_file_is_refused(tmp_path: Path) -> None:
    good = io.BytesIO()
    pq.write_table(pa.table({"x": np.arange(1000)}), good)
    path = tmp_path / "cut.parquet"
    path.write_bytes(good.getvalue()[:-20])
    with pytest.raises(InvalidDataset):
        open_source(path)


@pytest.mark.parametrize(
    "content",
    [b"PK\x03\x04 this zip archive is broken", b"not a numpy archive at all" * 10],
    ids=["broken-zip", "not-a-zip"],
)
def test_bytes_that_are_not_an_npz_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "arrays.npz"
    path.write_bytes(content)
    with pytest.raises(InvalidDataset, match=r"arrays\.npz"):
        open_source(path)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, X=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InvalidDataset, match=r"objects\.npz"):
        open_source(path)


def test_npz_arrays_of_different_lengths_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(InvalidDataset, match=r"different lengths \[3, 4\]"):
        open_source(path)


def test_npz_arrays_of_three_dimensions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.zeros((2, 2, 2)))
    with pytest.raises(InvalidDataset, match="'X' has 3 dimensions"):
        open_source(path)


def npz_bomb(path: Path, megabytes: int) -> Path:
    """An .npz of zeros: a few kilobytes that unpack to `megabytes` MiB."""
    np.savez_compressed(path, X=np.zeros((megabytes * 1024 * 1024 // 16, 2)))
    return path


def test_an_npz_that_unpacks_past_the_limit_is_refused_before_it_is_opened(
    tmp_path: Path,
) -> None:
    path = npz_bomb(tmp_path / "bomb.npz", megabytes=16)
    assert path.stat().st_size < 160 * 1024  # compressed over 100:1
    limit = 4 * 1024 * 1024
    with pytest.raises(InvalidDataset) as raised:
        open_source(path, max_archive_bytes=limit)
    assert f"{path}: its members unpack to 16777" in str(raised.value)
    assert f"over the limit of {limit} bytes (MLBUS_LIMITS__MAX_ARCHIVE_BYTES)" in str(raised.value)
    with path.open("rb") as handle, pytest.raises(InvalidDataset, match="over the limit"):
        open_stream(handle, path.stat().st_size, "upload.npz", "npz", max_archive_bytes=limit)
    assert open_source(path, max_archive_bytes=32 * 1024 * 1024).schema.names == ["f0", "f1"]


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}')
    with pytest.raises(InvalidDataset, match="unknown format 'json'"):
        open_source(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset, match="no such file"):
        open_source(tmp_path / "nope.csv")


# -- memory -----------------------------------------------------------------------------------

_READ_SOURCE = """
import sys
from mlbus.datasets.sources import open_source

print(sum(batch.num_rows for batch in open_source(sys.argv[1]).batches))
"""


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_a_source_is_read_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    """Reading a source batch by batch must not hold the file: the kernel's peak RSS of a
    process reading a small and a 4-5x larger file differs by allocator noise (tens of MiB),
    not by the difference in size. (Parquet: pyarrow's default pre-buffering keeps every
    row group read so far; CSV: a deep read-ahead of large blocks.)"""
    small_rows, large_rows = (400_000, 1_600_000) if kind == "parquet" else (300_000, 1_500_000)
    write = write_parquet_file if kind == "parquet" else write_csv_file
    script = tmp_path / "read.py"
    script.write_text(_READ_SOURCE)
    peaks, sizes = {}, {}
    for name, rows in (("small", small_rows), ("large", large_rows)):
        path = write(tmp_path / f"{name}.{kind}", rows)
        peak, out = run_measured([PYTHON, str(script), str(path)])
        assert int(out) == rows
        peaks[name], sizes[name] = peak, path.stat().st_size
    grown, extra = peaks["large"] - peaks["small"], sizes["large"] - sizes["small"]
    assert grown < extra / 2, (
        f"peak memory grew by {grown / 2**20:.0f} MiB reading {extra / 2**20:.0f} MiB more "
        f"(small: {peaks['small'] / 2**20:.0f} MiB, large: {peaks['large'] / 2**20:.0f} MiB): "
        f"the {kind} file is held in memory, not streamed"
    )


# -- the row-group limit ---------------------------------------------------------------------


def test_a_row_group_over_the_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big-groups.parquet"
    table = pa.table({"x": np.arange(100_000, dtype=np.float64), "y": np.arange(100_000)})
    pq.write_table(table, path, row_group_size=40_000)  # ~640 KB uncompressed each
    limit = 200_000

    with pytest.raises(InvalidDataset) as refused:
        open_source(path, max_row_group_bytes=limit)
    message = str(refused.value)
    assert "row group 0 (40000 rows)" in message and f"limit of {limit} bytes" in message
    assert "MLBUS_LIMITS__MAX_ROW_GROUP_BYTES" in message

    with pytest.raises(InvalidDataset, match="row group 0"):  # an upload: the same check
        open_stream(
            io.BytesIO(path.read_bytes()),
            None,
            "upload.parquet",
            "parquet",
            max_row_group_bytes=limit,
        )

    assert consume(path, max_row_group_bytes=1_000_000).equals(table)  # under it: read
