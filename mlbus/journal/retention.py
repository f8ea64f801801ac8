"""Retention of the embedded log: `trim` rewrites the journal without the records each topic's
retention (`retention.ms`, as the topic was created: the catalog's) has expired, and `advance`
moves a fresh partition's end to where its kept records start, so that a restore puts every
kept record back at the offset it had.

Writes the journal's segments and `starts.json`; writes to the broker one transaction marker
per trimmed partition (docs/broker.md, "Retention").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlbus.errors import JournalError
from mlbus.journal.format import (
    TOPICS_FILE,
    VERSION,
    Batch,
    Scan,
    SegmentWriter,
    encode_batch,
    read_journal,
    read_json,
    segments,
    write_json,
)

Positions = dict[str, dict[int, int]]
"""topic → partition → offset"""

STARTS_FILE = "starts.json"
"""topic → partition → the offset its kept records start at (only partitions trimmed)"""


@dataclass
class Trimmed:
    records: int = 0
    """records dropped as expired"""
    kept: int = 0
    seconds: float = 0.0
    starts: Positions = field(default_factory=dict)
    scan: Scan = field(default_factory=Scan)


def retention_ms(spec: dict[str, Any]) -> int | None:
    """A journaled topic's retention in ms; None: kept forever (no or a negative
    `retention.ms`, or a compacted topic, whose latest value per key must stay)."""
    configs = spec.get("configs") or {}
    if "compact" in str(configs.get("cleanup.policy", "")):
        return None
    try:
        value = int(configs.get("retention.ms", -1))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def read_starts(directory: Path) -> Positions:
    starts = read_json(directory / STARTS_FILE).get("starts", {})
    return {t: {int(p): int(o) for p, o in ps.items()} for t, ps in starts.items()}


def shortest_retention(directory: Path) -> int | None:
    """The shortest finite retention (ms) of the journaled topics; None: all kept forever."""
    topics = read_json(directory / TOPICS_FILE).get("topics", {})
    finite = [ms for spec in topics.values() if (ms := retention_ms(spec)) is not None]
    return min(finite) if finite else None


def trim(directory: Path, *, now_ms: int | None = None) -> Trimmed:
    """Rewrite the journal of `directory` without each partition's expired prefix: the
    records from its start up to the first one younger than its topic's retention (a log
    can only lose a prefix: offsets after it stay where they are). Forever topics are kept
    whole. Nothing is rewritten when nothing expired.

    Crash-safe in any order of events: the kept records go to a new segment numbered after
    every old one and `starts.json` is written first, so a restore that finds old segments
    still there skips what they repeat (and what precedes a start)."""
    started = time.monotonic()
    out = Trimmed()
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    topics: dict[str, Any] = read_json(directory / TOPICS_FILE).get("topics", {})
    cutoffs = {
        name: now_ms - ms for name, spec in topics.items() if (ms := retention_ms(spec)) is not None
    }
    old = segments(directory)
    if not cutoffs or not old:
        return out
    starts = read_starts(directory)
    work = directory / ".trim"
    shutil.rmtree(work, ignore_errors=True)
    writer = SegmentWriter(work)
    try:
        for batch in _kept(read_journal(directory, out.scan), cutoffs, starts, out):
            writer.write(encode_batch(batch.topic, batch.partition, batch.records))
            out.kept += len(batch)
    finally:
        writer.close()
    if not out.records:
        shutil.rmtree(work, ignore_errors=True)
        out.seconds = time.monotonic() - started
        return out
    # starts.json first: with it, old segments left behind by a crash are harmless.
    write_json(
        directory / STARTS_FILE,
        {
            "format": VERSION,
            "starts": {t: {str(p): o for p, o in ps.items()} for t, ps in starts.items()},
        },
    )
    number = int(old[-1].stem.split("-")[1]) + 1
    os.replace(writer.path, directory / f"segment-{number:08d}.mlj")
    _sync_dir(directory)
    for path in old:
        path.unlink()
    _sync_dir(directory)
    shutil.rmtree(work, ignore_errors=True)
    out.starts = starts
    out.seconds = time.monotonic() - started
    return out


def _kept(
    batches: Iterator[Batch], cutoffs: dict[str, int], starts: Positions, out: Trimmed
) -> Iterator[Batch]:
    """The batches of the journal without expired prefixes and repeated records; `starts`
    is updated to each trimmed partition's new start (its end when nothing is kept)."""
    nexts: Positions = {t: dict(ps) for t, ps in starts.items()}
    open_: set[tuple[str, int]] = set()
    """partitions whose prefix is over: everything after their first kept record is kept"""
    for batch in batches:
        key = (batch.topic, batch.partition)
        expected = nexts.setdefault(batch.topic, {}).get(batch.partition, 0)
        i = 0
        while i < len(batch) and batch.offsets[i] < expected:  # a crash's repeat
            i += 1
        if i == len(batch):
            continue
        cutoff = cutoffs.get(batch.topic)
        if cutoff is not None and key not in open_:
            first = i
            while i < len(batch) and 0 < batch.timestamps[i] < cutoff:
                i += 1
            out.records += i - first
            if i == len(batch):
                starts.setdefault(batch.topic, {})[batch.partition] = batch.offsets[-1] + 1
                nexts[batch.topic][batch.partition] = batch.offsets[-1] + 1
                continue
            open_.add(key)
            if i > first or expected > 0:
                starts.setdefault(batch.topic, {})[batch.partition] = batch.offsets[i]
        nexts[batch.topic][batch.partition] = batch.offsets[-1] + 1
        yield batch if i == 0 else _slice(batch, i)


def _slice(batch: Batch, i: int) -> Batch:
    return Batch(
        batch.topic,
        batch.partition,
        batch.offsets[i:],
        batch.timestamps[i:],
        batch.timestamp_types[i:],
        batch.keys[i:],
        batch.values[i:],
        batch.headers[i:],
    )


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- a partition's start on a fresh broker ----------------------------------------------------
#
# Neither Kafka's protocol nor the embedded broker has "produce at offset n", and the broker
# refuses DeleteRecords (it drops the connection). It does keep a batch's offset deltas as
# sent: a batch whose one record has offset delta d lands at end + d, and the partition's
# end becomes end + d + 1 (measured; Apache Kafka rewrites the deltas). So a fresh
# partition is moved to start s by one batch holding a single transaction marker (an ABORT
# control record, which every consumer skips: librdkafka and aiokafka, either isolation
# level) at offset s - 1. An empty batch moves the end too, but consumers stall on it.


def advance(kafka_bootstrap: str, starts: Positions, timeout: float = 10.0) -> None:
    """Move each listed partition of the fresh broker at `kafka_bootstrap` (whose
    partitions are empty) to begin at its start. JournalError if the broker refuses."""
    host, _, port = kafka_bootstrap.split(",")[0].rpartition(":")
    todo = [(t, p, s) for t, ps in sorted(starts.items()) for p, s in sorted(ps.items()) if s > 0]
    if not todo:
        return
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        for correlation, (topic, partition, start) in enumerate(todo):
            request = _produce_request(topic, partition, _marker_batch(start - 1), correlation)
            conn.sendall(request)
            error, base = _produce_response(conn)
            if error:
                raise JournalError(
                    f"restore: the broker refused to start {topic}[{partition}] at offset "
                    f"{start} (error {error}); the journal is left untouched"
                )
            if base != 0:
                raise JournalError(
                    f"restore: {topic}[{partition}] is not empty (its end is {base}); "
                    "cannot start it at the journal's offset"
                )


_CASTAGNOLI = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CASTAGNOLI.append(_c)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:  # a few dozen bytes per partition: a table loop is plenty
        crc = _CASTAGNOLI[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)  # zigzag
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _marker_batch(delta: int) -> bytes:
    """A v2 record batch of one ABORT marker at offset delta `delta` (attributes:
    transactional | control), no producer id."""
    now = int(time.time() * 1000)
    key = struct.pack(">hh", 0, 0)  # control record version 0, type ABORT
    value = struct.pack(">hi", 0, 0)  # version 0, coordinator epoch 0
    # record attributes, timestamp delta, offset delta, key, value, no headers
    body = b"".join(
        [b"\0", _varint(0), _varint(delta), _varint(len(key)), key, _varint(len(value))]
    )
    body += value + _varint(0)
    record = _varint(len(body)) + body
    after_crc = struct.pack(">hiqqqhii", 0x30, delta, now, now, -1, -1, -1, 1) + record
    tail = struct.pack(">ibI", -1, 2, _crc32c(after_crc)) + after_crc
    return struct.pack(">qi", 0, len(tail)) + tail


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _produce_request(topic: str, partition: int, batch: bytes, correlation: int) -> bytes:
    """Produce v3 (the first with record batches), acks=all, one partition."""
    header = struct.pack(">hhi", 0, 3, correlation) + _string("mlbus-restore")
    body = b"".join(
        [
            struct.pack(">h", -1),  # no transactional id
            struct.pack(">hi", -1, 10_000),  # acks=all, timeout
            struct.pack(">i", 1),
            _string(topic),
            struct.pack(">iii", 1, partition, len(batch)),
            batch,
        ]
    )
    message = header + body
    return struct.pack(">i", len(message)) + message


def _produce_response(conn: socket.socket) -> tuple[int, int]:
    (size,) = struct.unpack(">i", _read(conn, 4))
    data = _read(conn, size)
    at = 4 + 4  # correlation id, topic count
    (name,) = struct.unpack_from(">h", data, at)
    at += 2 + name + 4  # topic name, partition count
    _partition, error, base = struct.unpack_from(">ihq", data, at)
    return error, base


def _read(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = conn.recv(n)
        if not chunk:
            raise JournalError("restore: the broker closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
