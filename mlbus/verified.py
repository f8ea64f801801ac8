"""Which stored objects were already verified, so that an unchanged object is not hashed again:
a cache in the data dir (`<data_dir>/verified/`) from an object's identity to the sha256 its
bytes were found to have. It reads and writes no topic.

The identity is what changes whenever the bytes can have changed: on a local disk the
device, inode, size, mtime_ns and ctime_ns (ctime cannot be set back, so rewriting bytes in
place and restoring the mtime still changes it; a replaced file has a new inode or ctime);
on S3 the ETag and version id with size and last-modified. An identity is recorded only
after a full sha256 of the bytes matched, only if it did not change while they were hashed,
and, on a local disk, only once the file's timestamps are older than the file system's
timestamp granularity (`settle_seconds`): a write in the same clock tick as the recorded one
could otherwise keep every field equal ("racy" entries, as git calls them). Objects without
a reliable identity (memory://, unknown file systems) are always hashed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

Identity = dict[str, Any]

#: Timestamps newer than this (seconds) are not trusted yet; above the coarse clock tick of
#: local file systems (1-10 ms) with a margin for network mounts.
SETTLE_SECONDS = 1.0


def _local(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def _s3(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "s3" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def object_identity(fs: Any, path: str) -> Identity | None:
    """The identity of the object at `path` now, or None if the file system has none mlbus
    trusts. Storage errors propagate (the caller translates them)."""
    if _local(fs):
        st = os.stat(path)
        return {
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
        }
    if _s3(fs):
        fs.invalidate_cache(path)  # a listing cached by s3fs would hide an overwrite
        info = fs.info(path)
        etag = info.get("ETag")
        if not etag:
            return None
        modified = info.get("LastModified")
        return {
            "etag": str(etag),
            "version_id": info.get("VersionId"),
            "size": int(info.get("size", -1)),
            "modified": str(modified) if modified is not None else None,
        }
    return None


def _location(fs: Any, path: str) -> str:
    """Which object: the file system (and S3 endpoint) and the path."""
    if _local(fs):
        return f"file://{os.path.realpath(path)}"
    endpoint = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or ""
    return f"s3://{endpoint}|{path}"


def _settled(identity: Identity, settle_seconds: float) -> bool:
    if "mtime_ns" not in identity:
        return True  # an object store's identity changes with every write
    newest = max(identity["mtime_ns"], identity["ctime_ns"])
    return time.time_ns() - newest > settle_seconds * 1e9


class VerifiedObjects:
    """The cache: `lookup` before reading, `record` after a full hash matched."""

    def __init__(self, folder: Path | str, *, settle_seconds: float = SETTLE_SECONDS) -> None:
        self.folder = Path(folder)
        self.settle_seconds = settle_seconds

    def _entry(self, location: str) -> Path:
        return self.folder / (hashlib.sha256(location.encode()).hexdigest()[:40] + ".json")

    def lookup(self, fs: Any, path: str, identity: Identity | None) -> str | None:
        """The content hash recorded for this object at exactly this identity, or None."""
        if identity is None:
            return None
        location = _location(fs, path)
        try:
            entry = json.loads(self._entry(location).read_text())
        except (OSError, ValueError):
            return None
        if entry.get("location") != location or entry.get("identity") != identity:
            return None
        found = entry.get("content_hash")
        return found if isinstance(found, str) else None

    def record(
        self, fs: Any, path: str, identity: Identity | None, after: Identity | None, digest: str
    ) -> bool:
        """Remember that the object at `identity` hashes to `digest`, if it is safe to: the
        identity did not change while the bytes were hashed (`after`), and it has settled.
        A cache that cannot be written is no error (the object is hashed next time)."""
        if identity is None or identity != after or not _settled(identity, self.settle_seconds):
            return False
        location = _location(fs, path)
        entry = {"location": location, "identity": identity, "content_hash": digest}
        target = self._entry(location)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(entry, sort_keys=True))
            os.replace(temporary, target)  # atomic: readers see the old entry or the new one
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink()
            return False
        return True
