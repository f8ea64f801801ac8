"""Reading dataset versions — in the kernel, so that the trainer or any other consumer of
`dataset.created` can read what an event points at without importing the dataset manager.

Given the URI and content hash an event carries, `DatasetReader` streams the version as
Arrow record batches (column projection, batch size) and verifies the sha256 of the stored
bytes. The hash is computed by a second, sequential read in a thread while pyarrow decodes
(hashlib releases the GIL), and checked when the stream ends: a consumer must treat what it
read as unverified until the iterator is exhausted without a `HashMismatch`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mlbus.errors import MlbusError
from mlbus.storage import ObjectStore, StorageError, translated

CHUNK = 8 * 1024 * 1024


def iter_row_groups(
    file: pq.ParquetFile, *, columns: Sequence[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Batches of a Parquet file, one row group in memory at a time.

    `ParquetFile.iter_batches` with pyarrow's default `pre_buffer=True` caches the compressed
    bytes of every row group it has read until the iteration ends, i.e. the whole file;
    reading row group by row group bounds memory by the largest row group.
    """
    for index in range(file.num_row_groups):
        group = file.read_row_group(index, columns=columns, use_threads=True)
        yield from group.to_batches(max_chunksize=batch_size)
        del group


class HashMismatch(MlbusError):
    """Stored bytes do not hash to the content hash their event claims (or the event claims
    none, so they cannot be verified)."""


def sha256_of(fs: Any, path: str, stop: threading.Event | None = None) -> str:
    """`sha256:<hex>` of a file, read sequentially."""
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=CHUNK) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            if stop is not None and stop.is_set():
                break
    return "sha256:" + digest.hexdigest()


class _Hasher(threading.Thread):
    def __init__(self, fs: Any, path: str) -> None:
        super().__init__(name="mlbus-verify", daemon=True)
        self.fs, self.path = fs, path
        self.stop = threading.Event()
        self.result: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = sha256_of(self.fs, self.path, self.stop)
        except BaseException as e:  # reported to the reading thread
            self.error = e


class DatasetReader:
    """One dataset version on the object store (or an allowed root)."""

    def __init__(
        self,
        store: ObjectStore,
        uri: str,
        content_hash: str | None,
        *,
        columns: Sequence[str] | None = None,
        batch_size: int = 65_536,
        verify: bool = True,
    ) -> None:
        if verify and not content_hash:
            raise HashMismatch(f"{uri}: no content hash to verify against")
        self.uri = uri
        self.content_hash = content_hash
        self.columns = list(columns) if columns is not None else None
        self.batch_size = batch_size
        self.verify = verify
        self.fs, self.path = store.resolve(uri)
        local = "file" in getattr(self.fs, "protocol", ())
        with translated(f"reading {uri}"):  # local files through pyarrow's native reader
            source = self.path if local else self.fs.open(self.path, "rb", block_size=CHUNK)
            # Pre-buffering (coalesced reads) pays off on object stores, not on local disks.
            self._file = pq.ParquetFile(source, pre_buffer=not local)
        missing = [c for c in self.columns or [] if c not in self._file.schema_arrow.names]
        if missing:
            raise StorageError(f"{uri} has no column(s) {', '.join(missing)}")

    @property
    def schema(self) -> pa.Schema:
        schema = self._file.schema_arrow
        return (
            schema if self.columns is None else pa.schema([schema.field(c) for c in self.columns])
        )

    @property
    def num_rows(self) -> int:
        return self._file.metadata.num_rows

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        hasher = _Hasher(self.fs, self.path) if self.verify else None
        if hasher is not None:
            hasher.start()
        finished = False
        try:
            with translated(f"reading {self.uri}"):
                yield from iter_row_groups(
                    self._file, columns=self.columns, batch_size=self.batch_size
                )
            finished = True
        finally:
            if hasher is not None:
                if not finished:
                    hasher.stop.set()
                hasher.join()
        if hasher is not None:
            self._check(hasher)

    def _check(self, hasher: _Hasher) -> None:
        if hasher.error is not None:
            raise StorageError(f"verifying {self.uri}: {hasher.error}") from hasher.error
        if hasher.result != self.content_hash:
            raise HashMismatch(
                f"{self.uri}: stored bytes hash to {hasher.result}, "
                f"not the {self.content_hash} the event claims"
            )

    def read_all(self) -> pa.Table:
        """The whole version as one table (verified)."""
        return pa.Table.from_batches(list(self), schema=self.schema)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
