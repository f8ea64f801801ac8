"""DatasetReader: a dataset version streamed as Arrow record batches (projection, batch
size) from the local folder or S3, with the sha256 of the stored bytes verified when the
stream ends; and its memory, which must not grow with the size of the version."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbus.errors import MlbusError
from mlbus.storage import ObjectStore, StorageError
from mlbus.tables import DatasetReader, HashMismatch, sha256_of
from tests.mlbus.storage_support import (
    PYTHON,
    STORE_KINDS,
    make_store,
    run_measured,
    sha256_hex,
    write_parquet_file,
)

ROWS = 1000


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return make_store(request.param, request, tmp_path)


def table(rows: int = ROWS) -> pa.Table:
    return pa.table(
        {
            "x": pa.array(np.arange(rows, dtype=np.float64) / 7),
            "label": pa.array(np.arange(rows) % 10, type=pa.int64()),
            "name": pa.array([f"row-{i}" for i in range(rows)]),
        }
    )


def parquet_bytes(data: pa.Table, **options: object) -> bytes:
    sink = io.BytesIO()
    pq.write_table(data, sink, **options)
    return sink.getvalue()


def put(store: ObjectStore, key: str, data: bytes) -> tuple[str, str]:
    """Store `data` at `key`; its URI and content hash, as a dataset.created would carry."""
    store.write_bytes(key, data)
    return store.uri(key), sha256_hex(data)


def verify_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mlbus-verify"]


# -- reading --------------------------------------------------------------------------------


def test_batches_of_the_requested_size_and_the_hash_verified(store: ObjectStore) -> None:
    data = table()
    uri, content_hash = put(store, "v1/data.parquet", parquet_bytes(data))

    with DatasetReader(store, uri, content_hash, batch_size=300) as reader:
        assert reader.num_rows == ROWS
        assert reader.schema == data.schema
        batches = list(reader)
    assert [b.num_rows for b in batches] == [300, 300, 300, 100]
    assert pa.Table.from_batches(batches).equals(data)
    assert verify_threads() == []


def test_projection_reads_only_the_columns_asked_for(store: ObjectStore) -> None:
    data = table()
    uri, content_hash = put(store, "v1/data.parquet", parquet_bytes(data))

    reader = DatasetReader(store, uri, content_hash, columns=["label", "x"])
    assert reader.schema.names == ["label", "x"]
    result = reader.read_all()
    assert result.schema.names == ["label", "x"]
    assert result.column("label").to_pylist() == data.column("label").to_pylist()
    assert result.column("x").equals(data.column("x"))


def test_read_all_is_the_whole_version(store: ObjectStore) -> None:
    data = table()
    uri, content_hash = put(store, "v1/data.parquet", parquet_bytes(data))
    assert DatasetReader(store, uri, content_hash).read_all().equals(data)


def test_sha256_of_is_the_hash_events_carry(store: ObjectStore) -> None:
    raw = parquet_bytes(table())
    uri, content_hash = put(store, "v1/data.parquet", raw)
    fs, path = store.resolve(uri)
    assert sha256_of(fs, path) == content_hash


# -- integrity ------------------------------------------------------------------------------


def _read_until_error(reader: DatasetReader) -> tuple[list[pa.RecordBatch], BaseException | None]:
    seen: list[pa.RecordBatch] = []
    try:
        for batch in reader:
            seen.append(batch)
    except MlbusError as e:
        return seen, e
    return seen, None


def test_a_wrong_content_hash_fails_when_the_stream_ends(store: ObjectStore) -> None:
    uri, _ = put(store, "v1/data.parquet", parquet_bytes(table()))
    wrong = "sha256:" + "0" * 64

    seen, error = _read_until_error(DatasetReader(store, uri, wrong, batch_size=250))
    assert isinstance(error, HashMismatch), error
    assert wrong in str(error) and uri in str(error)
    # The batches came first: the check is at the end of the stream.
    assert sum(b.num_rows for b in seen) == ROWS
    assert verify_threads() == []


def test_bytes_changed_after_registration_fail_when_the_stream_ends(store: ObjectStore) -> None:
    """A byte flipped in a value: the file still decodes (uncompressed, plain encoding, no page
    checksums), the data read is wrong, and only the hash can tell."""
    data = pa.table({"x": pa.array(np.full(ROWS, 1.5))})
    raw = parquet_bytes(data, compression="none", use_dictionary=False)
    uri, content_hash = put(store, "v1/data.parquet", raw)

    tampered = bytearray(raw)
    at = raw.index(np.float64(1.5).tobytes()) + 8 * 500 + 7  # the sign/exponent byte of row 500
    tampered[at] ^= 0x40
    put(store, "v1/data.parquet", bytes(tampered))

    seen, error = _read_until_error(DatasetReader(store, uri, content_hash, batch_size=100))
    assert isinstance(error, HashMismatch), error
    values = pa.Table.from_batches(seen).column("x").to_numpy()
    assert len(values) == ROWS and (values != 1.5).sum() == 1  # it really was read wrong


def test_a_tampered_footer_fails_when_the_stream_ends(store: ObjectStore) -> None:
    raw = parquet_bytes(table())
    uri, content_hash = put(store, "v1/data.parquet", raw)
    marker = raw.rindex(b"parquet-cpp-arrow")  # the writer's name in the footer
    put(store, "v1/data.parquet", raw[:marker] + b"P" + raw[marker + 1 :])

    seen, error = _read_until_error(DatasetReader(store, uri, content_hash))
    assert isinstance(error, HashMismatch), error
    assert sum(b.num_rows for b in seen) == ROWS


def test_corrupt_compressed_pages_never_read_as_valid(store: ObjectStore) -> None:
    raw = parquet_bytes(table(), compression="snappy")
    uri, content_hash = put(store, "v1/data.parquet", raw)
    tampered = bytearray(raw)
    for at in range(100, 400, 37):  # inside the first column's data pages
        tampered[at] ^= 0xFF
    put(store, "v1/data.parquet", bytes(tampered))

    with pytest.raises((HashMismatch, StorageError)):
        DatasetReader(store, uri, content_hash).read_all()


def test_a_reader_needs_a_hash_unless_told_not_to_verify(store: ObjectStore) -> None:
    uri, _ = put(store, "v1/data.parquet", parquet_bytes(table()))
    with pytest.raises(HashMismatch, match="no content hash"):
        DatasetReader(store, uri, None)
    assert DatasetReader(store, uri, None, verify=False).read_all().num_rows == ROWS
    assert verify_threads() == []


def test_stopping_early_stops_the_verifying_thread_and_raises_nothing(store: ObjectStore) -> None:
    uri, _ = put(store, "v1/data.parquet", parquet_bytes(table()))
    reader = DatasetReader(store, uri, "sha256:" + "0" * 64, batch_size=10)
    for i, _batch in enumerate(reader):
        if i == 2:
            break
    assert verify_threads() == []


# -- errors ---------------------------------------------------------------------------------


def test_an_unknown_column_is_refused_by_name(store: ObjectStore) -> None:
    uri, content_hash = put(store, "v1/data.parquet", parquet_bytes(table()))
    with pytest.raises(StorageError, match="pixels"):
        DatasetReader(store, uri, content_hash, columns=["x", "pixels"])


def test_a_missing_file_is_a_storage_error(store: ObjectStore) -> None:
    with pytest.raises(StorageError):
        DatasetReader(store, store.uri("v9/missing.parquet"), "sha256:" + "0" * 64)


def test_a_file_that_is_not_parquet_is_a_storage_error(store: ObjectStore) -> None:
    uri, content_hash = put(store, "v1/data.parquet", b"name,value\nx,1\n" * 50)
    with pytest.raises(StorageError):
        DatasetReader(store, uri, content_hash)


def test_a_uri_outside_the_store_and_roots_is_refused(store: ObjectStore, tmp_path) -> None:
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(parquet_bytes(table()))
    with pytest.raises(StorageError, match="outside"):
        DatasetReader(store, outside.as_uri(), sha256_hex(outside.read_bytes()))
    store.allowed_roots = [str(tmp_path)]
    reader = DatasetReader(store, outside.as_uri(), sha256_hex(outside.read_bytes()))
    assert reader.read_all().num_rows == ROWS


# -- memory ---------------------------------------------------------------------------------

_READ_SCRIPT = """
import sys
from pathlib import Path
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader, sha256_of

folder, name = Path(sys.argv[1]), sys.argv[2]
store = ObjectStore(folder.as_uri())
uri = store.uri(name)
content_hash = sha256_of(*store.resolve(uri))
rows = sum(batch.num_rows for batch in DatasetReader(store, uri, content_hash))
print(rows)
"""


def test_reading_a_version_streams_it_in_bounded_memory(tmp_path: Path) -> None:
    """Peak memory must not grow with the version's size. Measured (kernel peak RSS of a
    process of its own) for a small and a 5x larger version: streaming costs the same for
    both; holding the data costs about the difference in size."""
    small_rows, large_rows = 400_000, 1_600_000  # ~40 MB and ~160 MB
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    write_parquet_file(store_dir / "small.parquet", small_rows, row_group=131_072)
    write_parquet_file(store_dir / "large.parquet", large_rows, row_group=131_072)
    script = tmp_path / "read.py"
    script.write_text(_READ_SCRIPT)

    peaks = {}
    for name, rows in (("small", small_rows), ("large", large_rows)):
        peak, out = run_measured([PYTHON, str(script), str(store_dir), f"{name}.parquet"])
        assert int(out) == rows
        peaks[name] = peak
    grown = peaks["large"] - peaks["small"]
    extra_bytes = (store_dir / "large.parquet").stat().st_size - (
        store_dir / "small.parquet"
    ).stat().st_size
    assert grown < extra_bytes / 2, (
        f"peak memory grew by {grown / 2**20:.0f} MiB reading {extra_bytes / 2**20:.0f} MiB "
        f"more (small: {peaks['small'] / 2**20:.0f} MiB, large: {peaks['large'] / 2**20:.0f} "
        f"MiB): the version is held in memory, not streamed"
    )
