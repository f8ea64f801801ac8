"""Reading dataset versions — in the kernel, so that the trainer or any other consumer of
`dataset.created` can read what an event points at without importing the dataset manager.

Given the URI and content hash an event carries, `DatasetReader` streams the version as
Arrow record batches (column projection, batch size) and verifies the sha256 of the stored
bytes. The hash is computed by a second, sequential read in a thread while pyarrow decodes
(hashlib releases the GIL), and checked when the stream ends: a consumer must treat what it
read as unverified until the iterator is exhausted without a `HashMismatch`. When the store
has a cache of verified objects (`mlbus.verified`, on unless `verify = "full"`), an object
whose identity (inode, size, times; an S3 ETag) matches one whose full hash matched before is
not hashed again; an identity that changes during the read is a `HashMismatch`.
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
from mlbus.verified import Identity, VerifiedObjects, object_identity

CHUNK = 8 * 1024 * 1024


class _Tally:
    """Bytes hashed by `sha256_of` in this process: what the verification cache saves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


HASHED = _Tally()


def check_row_groups(
    file: pq.ParquetFile, name: str, limit: int, error: type[Exception] = StorageError
) -> None:
    """Raise `error` if a row group declares more than `limit` uncompressed bytes: reading
    decompresses a whole row group at once, so this bounds memory before anything is read.
    The larger of the row group's total_byte_size and the sum of its column chunks'
    uncompressed sizes counts (writers fill in one or the other)."""
    metadata = file.metadata
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        columns = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns))
        size = max(group.total_byte_size, columns)
        if size > limit:
            raise error(
                f"{name}: row group {index} ({group.num_rows} rows) is {size} bytes "
                f"uncompressed, over the limit of {limit} bytes "
                "(MLBUS_LIMITS__MAX_ROW_GROUP_BYTES); write it with smaller row groups"
            )


def iter_row_groups(
    file: pq.ParquetFile, *, columns: Sequence[str] | None = None, batch_size: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Batches of a Parquet file, one row group in memory at a time.

    `ParquetFile.iter_batches` with pyarrow's default `pre_buffer=True` caches the compressed
    bytes of every row group it has read until the iteration ends, i.e. the whole file;
    reading row group by row group bounds memory by the largest row group (see
    `check_row_groups`).
    """
    for index in range(file.num_row_groups):
        group = file.read_row_group(index, columns=columns, use_threads=True)
        batches = group.to_batches(max_chunksize=batch_size)
        del group
        while batches:
            # Handed over and forgotten here: once the consumer drops a batch, nothing of
            # this row group keeps it alive while the next row group is decoded.
            yield batches.pop(0)


class HashMismatch(MlbusError):
    """Stored bytes do not hash to the content hash their event claims (or the event claims
    none, so they cannot be verified)."""


def sha256_of(fs: Any, path: str, stop: threading.Event | None = None) -> str:
    """`sha256:<hex>` of a file, read sequentially."""
    digest = hashlib.sha256()
    with fs.open(path, "rb", block_size=CHUNK) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            HASHED.add(len(chunk))
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
    """One dataset version on the object store (or an allowed root). After a full
    iteration, `verified_by` says how its bytes were checked: "sha256" (hashed while
    decoded), "cache" (an unchanged object whose hash matched before) or None (verify=False).
    """

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
        self.verified_by: str | None = None
        self.fs, self.path = store.resolve(uri)
        self._cache: VerifiedObjects | None = store.verified if verify else None
        local = "file" in getattr(self.fs, "protocol", ())
        with translated(f"reading {uri}"):  # local files through pyarrow's native reader
            # Before opening: if the object is replaced after this, the identity at the end
            # of the read differs, and the cache is not trusted.
            self._identity = self._now() if self._cache is not None else None
            source = self.path if local else self.fs.open(self.path, "rb", block_size=CHUNK)
            # Pre-buffering (coalesced reads) pays off on object stores, not on local disks.
            self._file = pq.ParquetFile(source, pre_buffer=not local)
        missing = [c for c in self.columns or [] if c not in self._file.schema_arrow.names]
        if missing:
            raise StorageError(f"{uri} has no column(s) {', '.join(missing)}")

    def _now(self) -> Identity | None:
        with translated(f"reading {self.uri}"):
            return object_identity(self.fs, self.path)

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
        cached = (
            self._cache.lookup(self.fs, self.path, self._identity)
            if self._cache is not None
            else None
        )
        trusted = cached is not None and cached == self.content_hash
        hasher = _Hasher(self.fs, self.path) if self.verify and not trusted else None
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
        if trusted:
            if self._now() != self._identity:
                raise HashMismatch(
                    f"{self.uri}: the object changed while it was read (its size, times or "
                    "ETag differ from when the read began); read it again"
                )
            self.verified_by = "cache"
        elif hasher is not None:
            self._check(hasher)
            self.verified_by = "sha256"
            if self._cache is not None and hasher.result is not None:
                self._cache.record(self.fs, self.path, self._identity, self._now(), hasher.result)

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
