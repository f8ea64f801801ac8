"""Verified reads that remember what they verified (mlbus/verified.py through DatasetReader),
on the local folder and on the moto S3 server: the first read hashes every byte, a read of
the same unchanged object hashes none, and an object that changed in any way — rewritten in
place with its size and mtime restored, replaced by a file of the same size and mtime,
overwritten on S3 — is hashed again, so a mismatch is still a `HashMismatch`. Whether bytes
were hashed is read from the process's tally of hashed bytes (`tables.HASHED`)."""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbus import tables
from mlbus.settings import Settings
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader, HashMismatch
from mlbus.verified import VerifiedObjects
from tests.mlbus.storage_support import STORE_KINDS, make_store, sha256_hex

#: Timestamps older than this are trusted in these tests; a write's ctime is at least a
#: clock tick (<= 10 ms) newer than a read that came before it, so this stays safe.
SETTLE = 0.05
MARKER = 1234567.875  # a float64 whose 8 bytes are easy to find in an uncompressed file


def parquet_bytes(marker: float = MARKER) -> bytes:
    data = pa.table({"x": pa.array([float(i) for i in range(999)] + [marker]), "y": range(1000)})
    sink = io.BytesIO()
    # Uncompressed and plain: a value's bytes can be changed in place and still decode.
    pq.write_table(data, sink, compression="none", use_dictionary=False)
    return sink.getvalue()


def settled() -> None:
    """Let a just-written file's timestamps age past SETTLE (a fresh file is not cached)."""
    time.sleep(SETTLE * 3)


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    store = make_store(request.param, request, tmp_path)
    store.verified = VerifiedObjects(tmp_path / "data" / "verified", settle_seconds=SETTLE)
    return store


def put(store: ObjectStore, key: str, raw: bytes) -> tuple[str, str]:
    store.write_bytes(key, raw)
    settled()
    return store.uri(key), sha256_hex(raw)


def read(store: ObjectStore, uri: str, content_hash: str) -> tuple[pa.Table, str | None, int]:
    """The table, how it was verified, and how many bytes were hashed for it."""
    before = tables.HASHED.bytes
    reader = DatasetReader(store, uri, content_hash)
    with reader:
        data = reader.read_all()
    return data, reader.verified_by, tables.HASHED.bytes - before


def test_an_unchanged_object_is_hashed_once(store: ObjectStore) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(store, "v1/data.parquet", raw)

    first, how, hashed = read(store, uri, content_hash)
    assert (how, hashed) == ("sha256", len(raw))

    again, how, hashed = read(store, uri, content_hash)
    assert (how, hashed) == ("cache", 0), "an unchanged, verified object was hashed again"
    assert again.equals(first)
    assert list((store.verified.folder).glob("*.json")), "nothing recorded in the data dir"


def test_an_overwritten_object_is_hashed_again_and_a_mismatch_still_raised(
    store: ObjectStore,
) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(store, "v1/data.parquet", raw)
    read(store, uri, content_hash)
    assert read(store, uri, content_hash)[1] == "cache"

    other = parquet_bytes(marker=7654321.125)
    assert len(other) == len(raw) and other != raw
    store.write_bytes("v1/data.parquet", other)  # a new local file, a new S3 ETag

    before = tables.HASHED.bytes
    with pytest.raises(HashMismatch, match="hash to"):
        DatasetReader(store, uri, content_hash).read_all()
    assert tables.HASHED.bytes - before == len(other)


def test_a_cached_object_does_not_pass_for_another_hash(store: ObjectStore) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(store, "v1/data.parquet", raw)
    read(store, uri, content_hash)

    with pytest.raises(HashMismatch):
        DatasetReader(store, uri, sha256_hex(b"something else")).read_all()


def test_a_mismatch_is_not_remembered(store: ObjectStore) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(store, "v1/data.parquet", raw)
    with pytest.raises(HashMismatch):
        DatasetReader(store, uri, sha256_hex(b"wrong")).read_all()
    assert read(store, uri, content_hash)[1:] == ("sha256", len(raw))


def test_without_the_cache_every_read_hashes_every_byte(store: ObjectStore) -> None:
    store.verified = None  # what MLBUS_VERIFY=full / --verify full configures
    raw = parquet_bytes()
    uri, content_hash = put(store, "v1/data.parquet", raw)
    assert read(store, uri, content_hash)[1:] == ("sha256", len(raw))
    assert read(store, uri, content_hash)[1:] == ("sha256", len(raw))


def test_the_setting_chooses_cached_or_full_verification(tmp_path: Path) -> None:
    common = dict(data_dir=tmp_path / "data", object_store_url=(tmp_path / "objects").as_uri())
    cached = ObjectStore.from_settings(Settings(**common))  # the default
    assert cached.verified is not None
    assert cached.verified.folder == tmp_path / "data" / "verified"
    assert ObjectStore.from_settings(Settings(**common, verify="full")).verified is None


# -- local disk: what an identity must catch --------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> ObjectStore:
    store = ObjectStore((tmp_path / "objects").as_uri())
    store.verified = VerifiedObjects(tmp_path / "data" / "verified", settle_seconds=SETTLE)
    return store


def test_bytes_rewritten_in_place_with_size_and_mtime_restored_are_hashed_again(
    local: ObjectStore,
) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(local, "v1/data.parquet", raw)
    read(local, uri, content_hash)
    path = Path(local.resolve(uri)[1])
    before = os.stat(path)

    at = raw.index(struct.pack("<d", MARKER))
    with open(path, "r+b") as handle:  # the same inode, the same size
        handle.seek(at)
        handle.write(struct.pack("<d", 7654321.125))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same mtime
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )

    with pytest.raises(HashMismatch):
        DatasetReader(local, uri, content_hash).read_all()


def test_a_replaced_file_of_the_same_size_and_mtime_is_hashed_again(
    local: ObjectStore, tmp_path: Path
) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(local, "v1/data.parquet", raw)
    read(local, uri, content_hash)
    path = Path(local.resolve(uri)[1])
    before = os.stat(path)

    replacement = tmp_path / "replacement.parquet"
    replacement.write_bytes(parquet_bytes(marker=7654321.125))
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, path)
    assert os.stat(path).st_size == before.st_size
    assert os.stat(path).st_mtime_ns == before.st_mtime_ns

    with pytest.raises(HashMismatch):
        DatasetReader(local, uri, content_hash).read_all()


def test_a_file_written_a_moment_ago_is_not_trusted_yet(local: ObjectStore) -> None:
    """A write in the same clock tick as the recorded identity could keep every field of
    it; so a file whose timestamps are that fresh is hashed, not remembered."""
    local.verified = VerifiedObjects(local.verified.folder, settle_seconds=3600)
    raw = parquet_bytes()
    uri, content_hash = put(local, "v1/data.parquet", raw)
    assert read(local, uri, content_hash)[1:] == ("sha256", len(raw))
    assert read(local, uri, content_hash)[1:] == ("sha256", len(raw))


def test_an_object_that_changes_during_a_trusted_read_is_refused(local: ObjectStore) -> None:
    raw = parquet_bytes()
    uri, content_hash = put(local, "v1/data.parquet", raw)
    read(local, uri, content_hash)
    path = Path(local.resolve(uri)[1])

    reader = DatasetReader(local, uri, content_hash)
    batches = iter(reader)
    next(batches)
    os.utime(path, ns=(0, 0))  # changed between the start and the end of the read
    with pytest.raises(HashMismatch, match="changed while it was read"):
        list(batches)
    reader.close()


def test_mlbus_up_passes_the_choice_to_its_services(tmp_path: Path) -> None:
    from mlbus.cli.platform import service_env

    for choice in ("full", "cached"):
        cfg = Settings(data_dir=tmp_path / "data", verify=choice)
        assert service_env(cfg)["MLBUS_VERIFY"] == choice
