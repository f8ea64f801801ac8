"""ObjectStore on a local folder and on a real S3 API (moto on loopback): objects, staged
writes that become visible only when complete, keys and URIs that may not leave the store,
and an unreachable store reported as a TransientError."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mlbus.errors import InvalidPath, MlbusError, TransientError
from mlbus.settings import Settings
from mlbus.storage import ObjectStore, StorageError, check_local_path, clean_key
from tests.mlbus.storage_support import (
    STORE_KINDS,
    everything,
    local_store,
    make_store,
    s3_bucket,
    s3_options,
    staging_leftovers,
)


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return make_store(request.param, request, tmp_path)


class Boom(Exception):
    pass


# -- objects --------------------------------------------------------------------------------


def test_objects_round_trip(store: ObjectStore) -> None:
    store.write_bytes("a/b/c.bin", b"hello")
    store.write_bytes("top.txt", b"x" * 10)

    assert store.read_bytes("a/b/c.bin") == b"hello"
    assert store.exists("a/b/c.bin") and not store.exists("a/b/other.bin")
    assert store.size("top.txt") == 10
    assert store.list("") == ["a/b/c.bin", "top.txt"]
    assert store.list("a") == ["a/b/c.bin"]
    assert store.list("nothing-here") == []
    with store.open("a/b/c.bin") as handle:
        assert handle.read() == b"hello"

    store.delete("a/b/c.bin")
    store.delete("a/b/c.bin")  # deleting what is gone is not an error
    assert store.list("") == ["top.txt"]
    assert staging_leftovers(store) == []


def test_uris_name_objects_inside_the_store(store: ObjectStore) -> None:
    uri = store.uri("datasets/x/data.parquet")
    assert uri.startswith(store.url + "/") and uri.endswith("/datasets/x/data.parquet")
    assert store.key_of(uri) == "datasets/x/data.parquet"
    with pytest.raises(StorageError, match="not inside"):
        store.key_of("s3://some-other-bucket/datasets/x/data.parquet")


def test_reading_a_missing_object_is_a_storage_error(store: ObjectStore) -> None:
    with pytest.raises(StorageError, match="no such object"):
        store.read_bytes("missing.bin")


# -- staged writes --------------------------------------------------------------------------


def test_a_staged_write_is_invisible_until_the_block_completes(store: ObjectStore) -> None:
    with store.staged("final/object.bin") as staged:
        staged.write(b"part one, ")
        staged.write(memoryview(b"part two"))
        assert not store.exists("final/object.bin")
        assert store.list("") == []
        assert staged.written == len(b"part one, part two")

    assert store.read_bytes("final/object.bin") == b"part one, part two"
    assert store.list("") == ["final/object.bin"]
    assert staging_leftovers(store) == []


def test_the_final_key_may_be_chosen_once_the_bytes_are_written(store: ObjectStore) -> None:
    with store.staged() as staged:
        staged.write(b"content-addressed")
        staged.set_key("by-content/abc")
    assert store.read_bytes("by-content/abc") == b"content-addressed"
    assert everything(store) == ["by-content/abc"]


def test_an_error_inside_the_block_leaves_no_object_and_no_staging(store: ObjectStore) -> None:
    with pytest.raises(Boom), store.staged("final/object.bin") as staged:
        staged.write(b"half of it")
        raise Boom()

    assert not store.exists("final/object.bin")
    assert everything(store) == []


def test_a_failed_write_larger_than_one_upload_part_leaves_nothing(store: ObjectStore) -> None:
    # Above s3fs's 5 MiB block size the upload is a multipart upload already under way.
    with pytest.raises(Boom), store.staged("big.bin") as staged:
        for _ in range(7):
            staged.write(os.urandom(1024 * 1024))
        raise Boom()

    assert everything(store) == []
    if store.scheme == "s3":
        bucket = store.root.split("/", 1)[0]
        pending = store.fs.call_s3("list_multipart_uploads", Bucket=bucket)
        assert pending.get("Uploads", []) == [], "an aborted upload was left open"


def test_a_failed_staged_write_closes_its_handle(store: ObjectStore) -> None:
    """The file object of an aborted write is discarded *and* closed: otherwise the garbage
    collector later closes it, which on S3 tries to upload a discarded buffer (an
    AttributeError printed as 'Exception ignored in ... __del__') and locally leaks the
    file descriptor until then."""
    with pytest.raises(Boom), store.staged("x.bin") as staged:
        staged.write(b"abc")
        raise Boom()
    assert staged.handle.closed


def test_a_staged_write_without_a_key_fails_and_leaves_nothing(store: ObjectStore) -> None:
    with pytest.raises(StorageError, match="without a final key"), store.staged() as staged:
        staged.write(b"orphan")
    assert everything(store) == []


def test_abandon_throws_the_written_bytes_away(store: ObjectStore) -> None:
    with store.staged("kept.bin") as staged:
        staged.write(b"not wanted after all")
        staged.abandon()
    assert not store.exists("kept.bin")
    assert everything(store) == []


def test_a_staged_write_replaces_an_existing_object_only_when_complete(
    store: ObjectStore,
) -> None:
    store.write_bytes("obj", b"old")
    with pytest.raises(Boom), store.staged("obj") as staged:
        staged.write(b"new")
        raise Boom()
    assert store.read_bytes("obj") == b"old"
    store.write_bytes("obj", b"new")
    assert store.read_bytes("obj") == b"new"
    assert everything(store) == ["obj"]


# -- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, normalized",
    [("a/b", "a/b"), ("a/./b", "a/b"), ("a//b", "a/b"), ("a/x/../b", "a/b"), ("f.txt", "f.txt")],
)
def test_clean_key_normalizes_relative_keys(key: str, normalized: str) -> None:
    assert clean_key(key) == normalized


@pytest.mark.parametrize(
    "key",
    ["..", "../x", "../../etc/passwd", "a/../../x", "a/b/../../..", "/etc/passwd", "/",
     "", ".", "a\\..\\b", "..\\x"],
)  # fmt: skip
def test_clean_key_refuses_keys_that_leave_the_store(key: str) -> None:
    with pytest.raises(StorageError):
        clean_key(key)


def test_no_operation_accepts_a_key_that_leaves_the_store(store: ObjectStore, tmp_path) -> None:
    for bad in ("../escaped.bin", "/etc/passwd", "a/../../escaped.bin"):
        with pytest.raises(StorageError):
            store.write_bytes(bad, b"x")
        with pytest.raises(StorageError):
            store.read_bytes(bad)
        with pytest.raises(StorageError):
            store.delete(bad)
        with pytest.raises(StorageError), store.staged() as staged:
            staged.write(b"x")
            staged.set_key(bad)
    assert not (tmp_path / "escaped.bin").exists()
    assert everything(store) == []


# -- URIs from events and users ---------------------------------------------------------------


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "data.csv").write_text("a\n1\n")
    return folder


def test_resolve_accepts_the_store_and_allowed_roots(
    store: ObjectStore, inbox: Path, tmp_path: Path
) -> None:
    store.allowed_roots = [str(inbox)]
    store.write_bytes("k/obj.bin", b"in the store")

    fs, path = store.resolve(store.uri("k/obj.bin"))
    assert fs.cat_file(path) == b"in the store"
    for given in (str(inbox / "data.csv"), (inbox / "data.csv").as_uri()):
        fs, path = store.resolve(given)
        assert Path(path) == inbox / "data.csv"
        assert fs.cat_file(path) == b"a\n1\n"


@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc/passwd",
        "file:///etc/",
        "/etc/passwd",
        "../../etc/passwd",
        "../../../../../../../../etc/passwd",
        "{inbox}/../secret.txt",
        "file://{inbox}/../secret.txt",
        "{inbox}-evil/data.csv",
        "{store}/../secret.txt",
        "{store}/../../../etc/passwd",
        "{store}-evil/x.bin",
        "s3://another-bucket/data.parquet",
        "http://example.com/data.parquet",
    ],
)
def test_resolve_refuses_uris_outside_the_store_and_allowed_roots(
    store: ObjectStore, inbox: Path, tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "secret.txt").write_text("secret")
    (tmp_path / "inbox-evil").mkdir()
    (tmp_path / "inbox-evil" / "data.csv").write_text("a\n1\n")
    monkeypatch.chdir(inbox)  # relative paths are taken from a directory inside a root
    store.allowed_roots = [str(inbox)]
    given = uri.format(inbox=inbox, store=store.url)
    with pytest.raises(StorageError) as refused:
        store.resolve(given)
    assert "outside" in str(refused.value) or "leaves" in str(refused.value), refused.value


def test_resolve_follows_symlinks_before_checking_the_root(
    store: ObjectStore, inbox: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.txt").write_text("secret")
    (inbox / "innocent.csv").symlink_to(tmp_path / "secret.txt")
    store.allowed_roots = [str(inbox)]
    with pytest.raises(StorageError, match="outside"):
        store.resolve(str(inbox / "innocent.csv"))


def test_a_store_with_no_allowed_roots_refuses_every_local_path(inbox: Path, tmp_path) -> None:
    store = local_store(tmp_path / "store")
    with pytest.raises(StorageError, match="outside"):
        store.resolve(str(inbox / "data.csv"))


@pytest.mark.parametrize(
    "uri",
    ["{inbox}/data.csv\x00.parquet", "file://{inbox}/\x00", "{store}/k\x00/obj.bin", "s3://b/\x00"],
)
def test_a_nul_byte_in_a_uri_is_refused_as_invalid(
    store: ObjectStore, inbox: Path, uri: str
) -> None:
    """Before the file system sees it: C would cut the name at the NUL, Python refuses it
    with a ValueError (a 500 at the API)."""
    store.allowed_roots = [str(inbox), "s3://b"]
    with pytest.raises(InvalidPath, match=r"contains a NUL byte \(\\x00\)"):
        store.resolve(uri.format(inbox=inbox, store=store.url))


def test_a_nul_byte_in_a_key_or_local_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidPath, match=r"object key 'a\\x00b' contains a NUL byte"):
        clean_key("a\x00b")
    with pytest.raises(InvalidPath, match="path"):
        check_local_path(f"{tmp_path}/x\x00y", [tmp_path])


def test_check_local_path_accepts_the_root_and_below_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    assert check_local_path(root, [root]) == root.resolve()
    assert check_local_path(f"file://{root}/sub", [root]) == (root / "sub").resolve()
    with pytest.raises(StorageError, match="allowed roots"):
        check_local_path(tmp_path / "rootless", [root])
    with pytest.raises(StorageError):
        check_local_path(root / ".." / "elsewhere", [root])


@pytest.mark.integration
def test_resolve_accepts_an_allowed_s3_root_but_not_its_neighbours(
    s3: dict[str, str], tmp_path: Path
) -> None:
    store = local_store(tmp_path / "store")
    lake = s3_bucket(s3)
    store.allowed_roots = [f"s3://{lake}/exports"]
    # URIs outside the store's own S3 options: the roots are checked before any connection.
    for uri in (
        f"s3://{lake}/exports/../private/x.parquet",
        f"s3://{lake}/exports-old/x.parquet",
        f"s3://{lake}/private/x.parquet",
    ):
        with pytest.raises(StorageError):
            store.resolve(uri)
    _, path = store.resolve(f"s3://{lake}/exports/day1/x.parquet")
    assert path == f"{lake}/exports/day1/x.parquet"


# -- S3 specifics -------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_an_unreachable_s3_endpoint_is_a_transient_error(s3: dict[str, str]) -> None:
    store = ObjectStore(
        "s3://bucket/prefix",
        s3_endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        # One attempt per call, so that the test does not sit through botocore's retries.
        storage_options=s3_options(s3, config_kwargs={"retries": {"max_attempts": 1}}),
    )
    operations = {
        "exists": lambda: store.exists("x"),
        "list": lambda: store.list(""),
        "read": lambda: store.read_bytes("x"),
        "write": lambda: store.write_bytes("x", b"data"),
    }
    for name, operation in operations.items():
        with pytest.raises(MlbusError) as caught:
            operation()
        assert isinstance(caught.value, TransientError), (name, repr(caught.value))
        assert "unreachable" in str(caught.value), (name, str(caught.value))


@pytest.mark.integration
def test_an_s3_store_from_settings_uses_the_standard_aws_credentials(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings carry the endpoint only; credentials come from botocore's usual chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3["secret"])
    bucket = s3_bucket(s3)
    settings = Settings(
        data_dir=tmp_path / "data",
        object_store_url=f"s3://{bucket}/from-settings",
        s3_endpoint_url=s3["endpoint_url"],
        allowed_roots=[str(tmp_path)],
    )
    store = ObjectStore.from_settings(settings)
    store.write_bytes("k.bin", b"via settings")
    assert store.read_bytes("k.bin") == b"via settings"
    assert store.list("") == ["k.bin"]
    assert store.allowed_roots == [str(tmp_path)]
    assert ObjectStore.allowed_roots == [], "a store's roots must not leak into other stores"


def test_an_unsupported_scheme_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="unsupported"):
        ObjectStore("ftp://example.com/objects")
