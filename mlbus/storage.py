"""Object storage for datasets, artifacts and archives: a local folder (`file://`) or S3
(`s3://bucket/prefix`, through s3fs), behind one small interface.

Writes are staged: bytes go to a temporary key and are moved to their final key only when
complete, so a failed write never leaves a partial object visible. Keys are relative paths
inside the store's root; URIs from events or users are accepted only inside the store or an
explicitly allowed root, and never with a NUL byte (`InvalidPath`). s3fs/botocore/OS errors
are translated here: an unreachable store is a `TransientError`, anything else a
`StorageError`.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import fsspec

from mlbus.errors import Invalid, InvalidPath, MlbusError, TransientError
from mlbus.verified import VerifiedObjects

STAGING = "_staging"


class StorageError(Invalid):
    """An object store operation failed for a reason retrying will not fix. An `Invalid`:
    what an API request names is missing, forbidden or outside the allowed roots."""


def _translate(error: BaseException, what: str) -> MlbusError:
    if isinstance(error, MlbusError):
        return error
    if isinstance(error, FileNotFoundError):
        return StorageError(f"{what}: no such object")
    if isinstance(error, PermissionError):
        return StorageError(f"{what}: permission denied")
    name = type(error).__name__
    if isinstance(error, (ConnectionError, TimeoutError)) or name in (
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ServerDisconnectedError",
    ):
        return TransientError(f"{what}: object store unreachable ({name})")
    return StorageError(f"{what}: {name}: {error}")


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Run a block, translating third-party storage errors into mlbus errors."""
    try:
        yield
    except MlbusError:
        raise
    except Exception as e:
        raise _translate(e, what) from e


def refuse_nul(value: str, what: str) -> str:
    """`value`, or `InvalidPath` if it holds a NUL byte: no file system or store can name
    it, and the C libraries underneath would silently cut it there."""
    if "\x00" in value:
        raise InvalidPath(f"{what} {value!r} contains a NUL byte (\\x00)")
    return value


def clean_key(key: str) -> str:
    """A normalized relative key; refuses absolute paths, `..` segments and NUL bytes."""
    refuse_nul(key, "object key")
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"invalid object key {key!r}")
    normalized = posixpath.normpath(key)
    if normalized.startswith("..") or "/../" in f"/{normalized}/" or normalized == ".":
        raise StorageError(f"object key {key!r} leaves the store")
    return normalized


class ObjectStore:
    """One store root: `file:///abs/folder`, `s3://bucket/prefix` or `memory://name`."""

    def __init__(
        self,
        url: str,
        *,
        s3_endpoint_url: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        parsed = urlparse(url)
        self.scheme = parsed.scheme or "file"
        options = dict(storage_options or {})
        if self.scheme == "s3":
            client = dict(options.pop("client_kwargs", {}) or {})
            if s3_endpoint_url:
                client["endpoint_url"] = s3_endpoint_url
            options["client_kwargs"] = client
            self.root = f"{parsed.netloc}{parsed.path}".rstrip("/")
        elif self.scheme == "file":
            self.root = str(Path(parsed.path or url).resolve())
            options.setdefault("auto_mkdir", True)
        elif self.scheme == "memory":
            self.root = f"/{parsed.netloc}{parsed.path}".rstrip("/")
        else:
            raise StorageError(f"unsupported object store {url!r} (file://, s3://, memory://)")
        self.url = (
            f"{self.scheme}://{self.root}" if self.scheme != "file" else f"file://{self.root}"
        )
        with translated(f"opening object store {self.url}"):
            self.fs = fsspec.filesystem(self.scheme, **options)
        self.storage_options = options

    @classmethod
    def from_settings(cls, settings: Any) -> ObjectStore:
        store = cls(settings.object_store_url, s3_endpoint_url=settings.s3_endpoint_url or None)
        store.allowed_roots = list(settings.allowed_roots)
        if settings.verify == "cached":
            store.verified = VerifiedObjects(Path(settings.data_dir) / "verified")
        return store

    #: Folders and URI prefixes outside the store that data may be read from.
    allowed_roots: list[str] = []
    #: Objects whose full hash matched before, by identity (mlbus/verified.py); None: every
    #: verified read hashes every byte.
    verified: VerifiedObjects | None = None

    def resolve(self, uri: str) -> tuple[Any, str]:
        """(filesystem, path) of a URI inside the store or an allowed root; refuses the rest
        (`../../etc/passwd`, `file:///etc/`) and any with a NUL byte."""
        refuse_nul(uri, "URI")
        if uri.startswith(self.url + "/"):
            return self.fs, self.path(self.key_of(uri))
        parsed = urlparse(uri)
        if parsed.scheme in ("", "file"):
            local = [r for r in self.allowed_roots if "://" not in r or r.startswith("file://")]
            path = check_local_path(
                uri, [Path(urlparse(r).path if "://" in r else r) for r in local]
            )
            return fsspec.filesystem("file"), str(path)
        if ".." in parsed.path.split("/"):
            raise StorageError(f"{uri} leaves its root")
        for root in self.allowed_roots:
            if uri.startswith(root.rstrip("/") + "/"):
                options = self.storage_options if parsed.scheme == self.scheme else {}
                with translated(f"opening {uri}"):
                    fs, path = fsspec.core.url_to_fs(uri, **options)
                return fs, path
        raise StorageError(
            f"{uri} is outside the object store {self.url} and the allowed roots; "
            f"set MLBUS_ALLOWED_ROOTS"
        )

    # -- naming -----------------------------------------------------------------------------

    def path(self, key: str) -> str:
        return f"{self.root}/{clean_key(key)}"

    def uri(self, key: str) -> str:
        return f"{self.url}/{clean_key(key)}"

    def key_of(self, uri: str) -> str:
        """The key of a URI inside this store; `StorageError` if it lies outside."""
        prefix = self.url + "/"
        if not uri.startswith(prefix):
            raise StorageError(f"{uri} is not inside the object store {self.url}")
        return clean_key(uri[len(prefix) :])

    # -- objects ----------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        with translated(f"checking {self.uri(key)}"):
            return bool(self.fs.exists(self.path(key)))

    def size(self, key: str) -> int:
        with translated(f"reading {self.uri(key)}"):
            return int(self.fs.size(self.path(key)))

    def open(self, key: str, mode: str = "rb", **kwargs: Any) -> IO[bytes]:
        with translated(f"opening {self.uri(key)}"):
            return self.fs.open(self.path(key), mode, **kwargs)

    def read_bytes(self, key: str) -> bytes:
        with translated(f"reading {self.uri(key)}"):
            return bytes(self.fs.cat_file(self.path(key)))

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.staged(key) as handle:
            handle.write(data)

    def delete(self, key: str) -> None:
        with translated(f"deleting {self.uri(key)}"), contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key))

    def move(self, key: str, to: str) -> None:
        """Move an object to another key (an S3 copy, then a delete: a move cut short
        leaves both, and moving again finishes it)."""
        with translated(f"moving {self.uri(key)} to {self.uri(to)}"):
            self.fs.mv(self.path(key), self.path(to))

    def list(self, prefix: str) -> list[str]:
        """Keys below `prefix` (recursively), staging area excluded."""
        base = self.path(prefix) if prefix else self.root
        with translated(f"listing {self.url}/{prefix}"):
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
        keys = [p[len(self.root) + 1 :] for p in found]
        return sorted(k for k in keys if not k.startswith(STAGING + "/"))

    @contextlib.contextmanager
    def staged(self, key: str | None = None) -> Iterator[Staged]:
        """Write to a temporary key; the object appears at its final key (given now, or set
        later with `staged.key = ...`) only if the block completes. On any error the
        temporary object is removed and nothing becomes visible."""
        staging_key = f"{STAGING}/{uuid.uuid4().hex}"
        target = Staged(self, staging_key, key)
        try:
            with translated(f"writing {self.uri(staging_key)}"):
                target.handle = self.fs.open(self.path(staging_key), "wb")
            yield target
            with translated(f"writing {self.uri(staging_key)}"):
                target.handle.close()
            if target.abandoned:
                with translated(f"removing {self.uri(staging_key)}"):
                    self.fs.rm(self.path(staging_key))
                return
            if target.key is None:
                raise StorageError("staged write finished without a final key")
            with translated(f"committing {self.uri(target.key)}"):
                self.fs.mv(self.path(staging_key), self.path(target.key))
        except BaseException:
            _discard(target.handle)
            with contextlib.suppress(Exception):
                self.fs.rm(self.path(staging_key))
            raise


def _discard(handle: Any) -> None:
    """Close a half-written file without committing it. s3fs's `discard()` aborts the
    multipart upload but leaves the file open (its finalizer would then try to upload);
    a local autocommit file refuses `discard()`."""
    if handle is None or handle.closed:
        return
    with contextlib.suppress(Exception):
        handle.discard()
    with contextlib.suppress(Exception):
        handle.closed = True  # s3fs: nothing left to upload
    with contextlib.suppress(Exception):
        if not handle.closed:
            handle.close()


class Staged:
    """A write in progress (see `ObjectStore.staged`); file-like."""

    def __init__(self, store: ObjectStore, staging_key: str, key: str | None) -> None:
        self.store = store
        self.staging_key = staging_key
        self.key = None if key is None else clean_key(key)
        self.handle: Any = None
        self.written = 0
        self.abandoned = False

    def write(self, data: bytes | memoryview) -> int:
        self.written += len(data)
        return self.handle.write(data)

    def set_key(self, key: str) -> None:
        self.key = clean_key(key)

    def abandon(self) -> None:
        """Throw the written bytes away instead of committing them."""
        self.abandoned = True


def check_local_path(path: str | os.PathLike[str], allowed_roots: Sequence[Path]) -> Path:
    """Resolve a user-given local path and refuse it unless it lies inside an allowed root."""
    raw = refuse_nul(str(path), "path")
    if raw.startswith("file://"):
        raw = urlparse(raw).path
    resolved = Path(raw).expanduser().resolve()
    for root in allowed_roots:
        root = Path(root).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    roots = ", ".join(str(r) for r in allowed_roots)
    raise StorageError(f"{path} is outside the allowed roots ({roots}); set MLBUS_ALLOWED_ROOTS")
