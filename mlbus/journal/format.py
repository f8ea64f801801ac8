"""The journal's files: append-only segments of CRC-framed record batches, and the small JSON
side files (topics, consumer-group offsets, durable positions). Reads and writes bytes only;
capture.py fills it from the broker and restore.py replays it (docs/broker.md, "Journal").

Segment: a header (magic, format version, creation time) then frames. A frame is its body's
length and CRC-32, then the body: one batch of consecutive records of one partition. A frame
cut short or failing its CRC at the very end of a segment is a torn write (the process or the
machine died while writing it): reported and skipped, the segment left as it is. Damage
anywhere else makes the journal unreadable: refused, never rewritten.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from mlbus.errors import DeliveryError, JournalTooNew, JournalUnreadable

MAGIC = b"MLBUSJNL"
#: The format this mlbus writes and the newest it reads. Raise it for any change a reader of
#: the previous version would misread; keep reading every older one.
VERSION = 1
_HEADER = struct.Struct("<8sHHq")  # magic, version, flags, created (ms since the epoch)
_FRAME = struct.Struct("<II")  # body length, CRC-32 of the body
_BATCH = struct.Struct("<BHiI")  # kind, topic length, partition, record count
# A batch is columnar: after its header and topic name, the records' offsets, timestamps (q
# each), timestamp types (b), key, value and headers lengths (i each; -1: null), then each
# record's key, value and headers bytes in turn. Decoding a column is one struct call.
_HEADER_ENTRY = struct.Struct("<Hi")  # in a headers blob: name length, value length (-1: null)
_HEADER_COUNT = struct.Struct("<H")
_KIND_RECORDS = 1
#: A length this large is damage, not a batch (records are at most a few MB each).
_MAX_FRAME = 1 << 30

SEGMENT_GLOB = "segment-*.mlj"
TOPICS_FILE = "topics.json"
GROUPS_FILE = "groups.json"
DURABLE_FILE = "durable.json"

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None


@dataclass(frozen=True, slots=True)
class Batch:
    """Consecutive records of one partition, as columns."""

    topic: str
    partition: int
    offsets: list[int]
    timestamps: list[int]
    timestamp_types: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]
    headers: list[Headers | None]

    @property
    def records(self) -> list[Record]:
        return [
            Record(*fields)
            for fields in zip(
                self.offsets,
                self.timestamps,
                self.timestamp_types,
                self.keys,
                self.values,
                self.headers,
                strict=True,
            )
        ]

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass
class Torn:
    """A torn final write: where it starts and how many bytes it holds."""

    segment: Path
    position: int
    size: int
    reason: str


@dataclass
class Scan:
    """What reading the journal found."""

    segments: int = 0
    frames: int = 0
    records: int = 0
    bytes: int = 0
    torn: list[Torn] = field(default_factory=list)
    per_topic: dict[str, int] = field(default_factory=dict)


# -- writing -------------------------------------------------------------------------------


def encode_batch(topic: str, partition: int, records: Sequence[Any]) -> bytes:
    """One frame holding `records` (confluent-kafka Messages or `Record`s) of one partition,
    consecutive in the order given."""
    if records and isinstance(records[0], Record):
        offsets = [r.offset for r in records]
        stamps = [r.timestamp for r in records]
        types = [r.timestamp_type for r in records]
        keys = [r.key for r in records]
        values = [r.value for r in records]
        headers = [r.headers for r in records]
    else:
        # The capture's hot path: one pass per column, each a comprehension of C calls.
        offsets = [m.offset() for m in records]
        timestamps = [m.timestamp() for m in records]
        types = [t[0] for t in timestamps]
        stamps = [t[1] for t in timestamps]
        keys = [m.key() for m in records]
        values = [m.value() for m in records]
        headers = [m.headers() for m in records]
    # Most records of a batch carry the headers of the one before (one content type).
    hblobs: list[bytes | None] = []
    last: Any = None
    blob: bytes | None = None
    for h in headers:
        if h != last:
            last, blob = h, None if h is None else _encode_headers(h)
        hblobs.append(blob)
    n = len(offsets)
    name = topic.encode()
    body = b"".join(
        [
            _BATCH.pack(_KIND_RECORDS, len(name), partition, n),
            name,
            struct.pack(
                f"<{n}q{n}q{n}b{n}i{n}i{n}i",
                *offsets,
                *stamps,
                *types,
                *[-1 if k is None else len(k) for k in keys],
                *[-1 if v is None else len(v) for v in values],
                *[-1 if h is None else len(h) for h in hblobs],
            ),
            # Each record's key, value and headers in turn; a null one (length -1) adds no
            # bytes.
            *[b or b"" for b in chain.from_iterable(zip(keys, values, hblobs, strict=True))],
        ]
    )
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def _encode_headers(headers: Sequence[tuple[str, str | bytes | None]]) -> bytes:
    parts = [_HEADER_COUNT.pack(len(headers))]
    for hname, hvalue in headers:
        encoded = hname.encode()
        if isinstance(hvalue, str):
            hvalue = hvalue.encode()
        parts.append(_HEADER_ENTRY.pack(len(encoded), -1 if hvalue is None else len(hvalue)))
        parts.append(encoded)
        if hvalue:
            parts.append(hvalue)
    return b"".join(parts)


def _decode_headers(blob: bytes) -> Headers:
    (count,) = _HEADER_COUNT.unpack_from(blob)
    at = _HEADER_COUNT.size
    headers: Headers = []
    for _ in range(count):
        hlen, hvlen = _HEADER_ENTRY.unpack_from(blob, at)
        at += _HEADER_ENTRY.size
        hname = blob[at : at + hlen].decode()
        at += hlen
        hvalue = None
        if hvlen >= 0:
            hvalue = blob[at : at + hvlen]
            at += hvlen
        headers.append((hname, hvalue))
    if at != len(blob):
        raise ValueError("a headers blob longer than its headers")
    return headers


class SegmentWriter:
    """Appends frames to a new segment of `directory`. `write` hands them to the OS (they
    survive the death of this process); `sync` makes them survive a power cut."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        existing = segments(directory)
        number = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        self.path = directory / f"segment-{number:08d}.mlj"
        # O_EXCL: never append to (or clobber) a segment another writer left behind.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._file = os.fdopen(fd, "ab", buffering=0)
        self._file.write(_HEADER.pack(MAGIC, VERSION, 0, int(time.time() * 1000)))
        self.sync()
        _sync_dir(directory)
        self.dirty = False

    def write(self, frames: bytes) -> None:
        view = memoryview(frames)
        while view:  # an unbuffered write may be partial
            written = self._file.write(view)
            view = view[written or 0 :]
        self.dirty = True

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        self.dirty = False

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()


# -- reading -------------------------------------------------------------------------------


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(SEGMENT_GLOB))


def check_header(path: Path, data: Any) -> int:
    """The segment's format version; JournalUnreadable / JournalTooNew otherwise."""
    if len(data) < _HEADER.size:
        raise JournalUnreadable(f"{path}: {len(data)} bytes, shorter than a journal header")
    magic, version, _flags, _created = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise JournalUnreadable(f"{path}: not an mlbus journal segment (bad magic {magic!r})")
    if version > VERSION:
        raise JournalTooNew(
            f"{path}: journal format {version} was written by a newer mlbus; this one reads "
            f"format {VERSION} and older. Upgrade mlbus; the journal is left untouched"
        )
    if version < 1:
        raise JournalUnreadable(f"{path}: journal format {version} does not exist")
    return int(version)


def read_segment(path: Path, scan: Scan | None = None) -> Iterator[Batch]:
    """Every batch of one segment, in order; a torn tail is recorded in `scan` and ends it.
    The file is mapped, not read: a segment may be larger than memory."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            check_header(path, b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield from _read_frames(path, mapped, scan if scan is not None else Scan())


def _read_frames(path: Path, data: Any, scan: Scan) -> Iterator[Batch]:
    check_header(path, data)
    scan.segments += 1
    scan.bytes += len(data)
    position, end = _HEADER.size, len(data)
    while position < end:
        problem = None
        if end - position < _FRAME.size:
            problem = "a frame header cut short"
        else:
            length, crc = _FRAME.unpack_from(data, position)
            start = position + _FRAME.size
            if length > _MAX_FRAME or start + length > end:
                problem = "a frame cut short"
            elif length < _BATCH.size:
                problem = "a frame too short to hold a batch"
            elif zlib.crc32(data[start : start + length]) != crc:
                problem = "a frame failing its checksum"
        if problem is not None:
            if not _is_tail(data, position, problem):
                raise JournalUnreadable(
                    f"{path}: {problem} at byte {position}, followed by more data: the journal "
                    f"is damaged, not torn; it is left untouched (`mlbus journal verify`)"
                )
            scan.torn.append(Torn(path, position, end - position, problem))
            return
        batch = _decode_batch(data, start, length, path, position)
        scan.frames += 1
        scan.records += len(batch)
        scan.per_topic[batch.topic] = scan.per_topic.get(batch.topic, 0) + len(batch)
        yield batch
        position = start + length


def _is_tail(data: Any, position: int, problem: str) -> bool:
    """A damaged frame is a torn final write when nothing valid can follow it: it runs past
    the end, or it is the segment's last frame by its own length, or the rest is zeros (a
    file system may extend a file before the data lands)."""
    if problem.endswith("cut short"):
        return True
    length, _ = _FRAME.unpack_from(data, position)
    following = position + _FRAME.size + length
    return following >= len(data) or not data[position:].strip(b"\0")


def _decode_batch(data: Any, start: int, length: int, path: Path, position: int) -> Batch:
    try:
        kind, name_len, partition, n = _BATCH.unpack_from(data, start)
        if kind != _KIND_RECORDS:
            raise ValueError(f"unknown frame kind {kind}")
        at = start + _BATCH.size
        topic = data[at : at + name_len].decode()
        at += name_len
        columns = struct.unpack_from(f"<{n}q{n}q{n}b{n}i{n}i{n}i", data, at)
        at += n * (8 + 8 + 1 + 4 + 4 + 4)
        klens, vlens, hlens = columns[3 * n : 4 * n], columns[4 * n : 5 * n], columns[5 * n :]
        keys: list[bytes | None] = []
        values: list[bytes | None] = []
        headers: list[Headers | None] = []
        decoded: dict[bytes, Headers] = {}
        for klen, vlen, hlen in zip(klens, vlens, hlens, strict=True):
            if klen < 0:
                keys.append(None)
            else:
                keys.append(data[at : at + klen])
                at += klen
            if vlen < 0:
                values.append(None)
            else:
                values.append(data[at : at + vlen])
                at += vlen
            if hlen < 0:
                headers.append(None)
            else:
                blob = data[at : at + hlen]
                at += hlen
                found = decoded.get(blob)
                if found is None:
                    found = decoded[blob] = _decode_headers(blob)
                headers.append(found)
        if at != start + length:
            raise ValueError("the records do not fill the frame")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        # The CRC held, so these bytes are what a writer wrote: a format this code misreads.
        raise JournalUnreadable(
            f"{path}: frame at byte {position} cannot be decoded: {e}"
        ) from None
    return Batch(
        topic,
        partition,
        list(columns[:n]),
        list(columns[n : 2 * n]),
        list(columns[2 * n : 3 * n]),
        keys,
        values,
        headers,
    )


def check_versions(directory: Path) -> None:
    """Refuse a journal this mlbus cannot read (foreign or newer segments or side files) by
    their headers alone: before anything is started or produced."""
    for path in segments(directory):
        with open(path, "rb") as f:
            check_header(path, f.read(_HEADER.size))
    for name in (TOPICS_FILE, GROUPS_FILE):
        read_json(directory / name)


def read_journal(directory: Path, scan: Scan | None = None) -> Iterator[Batch]:
    """Every batch of every segment, oldest first. Every header is checked before the first
    batch is given, so a newer or foreign segment refuses the whole journal up front."""
    paths = segments(directory)
    for path in paths:
        with open(path, "rb") as f:
            check_header(path, f.read(_HEADER.size))
    for path in paths:
        yield from read_segment(path, scan)


# -- side files ----------------------------------------------------------------------------


def write_json(path: Path, content: dict[str, Any], *, durable: bool = True) -> None:
    """Replace `path` atomically (a reader sees the old or the new file, whole)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(content, sort_keys=True).encode())
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)
    if durable:
        _sync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any]:
    """A side file; {} when absent. A newer format is refused like a newer segment."""
    try:
        content = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise JournalUnreadable(f"{path}: not JSON ({e}); left untouched") from None
    if not isinstance(content, dict):
        raise JournalUnreadable(f"{path}: not a journal side file; left untouched")
    version = content.get("format", 1)
    if not isinstance(version, int) or version > VERSION:
        raise JournalTooNew(
            f"{path}: journal format {version} was written by a newer mlbus; this one reads "
            f"format {VERSION} and older. Upgrade mlbus; the journal is left untouched"
        )
    return content


def wait_durable(directory: Path, offsets: dict[tuple[str, int], int], timeout: float) -> None:
    """Return once the journal of `directory` has every (topic, partition) up to its offset
    on disk; at once if no `mlbus up` keeps a journal there. DeliveryError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = json.loads((directory / DURABLE_FILE).read_bytes())
        except (FileNotFoundError, ValueError):
            return  # no journal kept here
        if not _alive(state.get("pid")):
            return  # its `mlbus up` is gone: nothing will catch up
        positions = state.get("positions", {})
        missing = [
            (topic, partition)
            for (topic, partition), offset in offsets.items()
            if positions.get(topic, {}).get(str(partition), 0) <= offset
        ]
        if not missing:
            return
        if time.monotonic() > deadline:
            topic, partition = missing[0]
            raise DeliveryError(
                f"the broker took the records but the journal in {directory} did not have "
                f"{topic}[{partition}] on disk within {timeout:.0f}s"
            )
        time.sleep(0.01)


class Captured:
    """Where the journal of `directory` has every partition on disk (durable.json), re-read
    only when the file is replaced: the sign of new records a consumer that stopped fetching
    while idle waits for (mlbus/kafka/logview.py). A stat per look when nothing changes."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / DURABLE_FILE
        self._stamp: tuple[int, int] | None = None
        self._positions: dict[str, dict[str, int]] = {}
        self._pid: object = None

    def refresh(self) -> bool:
        """Read the file again if it was replaced since; True if it was."""
        try:
            info = self.path.stat()
        except OSError:
            return False
        stamp = (info.st_ino, info.st_mtime_ns)  # replaced atomically: a new inode each time
        if stamp == self._stamp:
            return False
        try:
            state = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return False
        self._stamp = stamp
        self._pid = state.get("pid") if isinstance(state, dict) else None
        positions = state.get("positions", {}) if isinstance(state, dict) else {}
        self._positions = positions if isinstance(positions, dict) else {}
        return True

    def live(self) -> bool:
        """True if the file was read and the `mlbus up` that writes it still runs: else no
        journal will show new records (a broker started without one, or a journal left by an
        earlier `mlbus up`)."""
        return self._stamp is not None and _alive(self._pid)

    def beyond(self, positions: Mapping[tuple[str, int], int]) -> bool:
        """True if the journal has a record at or after one of `positions` ((topic,
        partition) → the next offset a reader will read)."""
        return any(
            self._positions.get(topic, {}).get(str(partition), 0) > offset
            for (topic, partition), offset in positions.items()
        )


def _alive(pid: object) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _sync_dir(directory: Path) -> None:
    # A new or renamed file survives a power cut only once its directory entry does.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
