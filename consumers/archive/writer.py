"""The archiver (`mlbus archive run`): a consumer group over every contract topic that
writes each record, raw, to Parquet files on the object store (layout.py), flushing by size
and by time. Reads every topic of the catalog (dead letters included); writes no topic.

Exactly once per record — the file *is* the position:
- a file holds a run of consecutive offsets of one partition and is named after them
  (`p<partition>-<first>-<last>.parquet`); it appears whole or not at all (the store's
  staged write: temporary key, then a move);
- a partition's files are written in offset order, so what is on the store is always a
  prefix of the partition: its high-water mark is one past the largest `last` in the names;
- on every (re)assignment the archiver lists the partition's files and seeks to that
  high-water mark (the beginning if there are none), whatever the group committed; so a
  crash after a file became durable and before the commit re-reads nothing it archived;
- the group's offsets are committed after the files are durable, never before; they serve
  lag monitoring and are never trusted over the store.
A revoked partition's buffer is flushed before it is handed over; a *lost* one (another
member already owns it) is dropped unwritten. Should two members still overlap (a zombie
past its session), they write the same records under different cuts, never different
records under one name, and the reader skips offsets it has already yielded.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from mlbus.consumers.archive import DEFAULT_GROUP
from mlbus.consumers.archive.layout import (
    NO_DATE,
    archive_table,
    day_of,
    file_key,
    high_water,
    list_files,
)
from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Backoff, Consumed, next_batch
from mlbus.schemas.catalog import TOPICS, topic
from mlbus.signals import install_stop_handlers
from mlbus.storage import ObjectStore

log = logging.getLogger("mlbus.consumers.archive")

DAY_MS = 24 * 3600 * 1000
#: Retries of a failing object store: patient, the records wait in Kafka meanwhile.
STORE_BACKOFF = Backoff(initial=0.5, maximum=30.0)
_PER_RECORD = 64  # bytes a record costs beyond its key and value (offsets, headers, lists)


@dataclass
class ArchiveStats:
    records: int = 0
    files: int = 0
    bytes: int = 0  # Parquet bytes written
    commits: int = 0
    skipped: int = 0  # records below the archive's high-water mark (already archived)


class _Piece:
    """Consecutive records of one partition on one UTC date: one future file."""

    __slots__ = ("columns", "day", "hi", "lo", "nbytes", "opened", "partition", "topic")

    def __init__(self, topic: str, partition: int, timestamp_ms: int | None) -> None:
        self.topic = topic
        self.partition = partition
        self.day = day_of(timestamp_ms)
        if timestamp_ms is None:
            self.lo, self.hi = -1, -1
        else:  # the day's bounds, so that a record's date is two integer comparisons
            self.lo = timestamp_ms - timestamp_ms % DAY_MS
            self.hi = self.lo + DAY_MS
        self.opened = time.monotonic()
        self.nbytes = 0
        self.columns: tuple[list[Any], ...] = ([], [], [], [], [])  # offset ts key hdrs value

    def accepts(self, timestamp_ms: int | None) -> bool:
        if timestamp_ms is None:
            return self.day == NO_DATE
        return self.lo <= timestamp_ms < self.hi

    def add(self, message: Consumed, timestamp_ms: int | None) -> None:
        offsets, stamps, keys, headers, values = self.columns
        key, value = message.key(), message.value()
        offsets.append(message.offset())
        stamps.append(timestamp_ms)
        keys.append(key)
        headers.append(message.headers())
        values.append(value)
        self.nbytes += _PER_RECORD + (len(key) if key else 0) + (len(value) if value else 0)

    @property
    def first(self) -> int:
        return self.columns[0][0]

    @property
    def last(self) -> int:
        return self.columns[0][-1]

    def table(self) -> pa.Table:
        offsets, stamps, keys, headers, values = self.columns
        n = len(offsets)
        return archive_table(
            [self.topic] * n, [self.partition] * n, offsets, stamps, keys, headers, values
        )


def write_piece(store: ObjectStore, table: pa.Table, key: str) -> int:
    """Write one archive file atomically (staged, then moved into place); its size."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    with store.staged(key) as out:
        out.write(memoryview(data))
    return data.size


@dataclass
class _Partition:
    pieces: list[_Piece] = field(default_factory=list)
    next_offset: int = 0  # the first offset not yet archived (or buffered)


class Archiver:
    """Archive `topics` (contract names; default: the whole catalog) into `store`."""

    def __init__(
        self,
        kafka: KafkaConfig,
        store: ObjectStore,
        *,
        group: str = DEFAULT_GROUP,
        topics: Sequence[str] | None = None,
        flush_bytes: int = 64 * 1024 * 1024,
        flush_seconds: float = 60.0,
        batch_size: int = 10_000,
        backoff: Backoff = STORE_BACKOFF,
        consumer_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.group = group
        self.topics = list(topics) if topics is not None else list(TOPICS)
        for name in self.topics:
            topic(name)  # UnknownTopic, naming the contract's topics
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self.batch_size = batch_size
        self.backoff = backoff
        self.stats = ArchiveStats()
        self._overrides = dict(consumer_overrides or {})
        self._consumer: Consumer | None = None
        self._parts: dict[tuple[str, int], _Partition] = {}  # by (kafka topic, partition)
        self._at_end: set[tuple[str, int]] = set()
        self._buffered = 0
        self._failures = 0
        self._retry_at = 0.0
        self._stopping = threading.Event()
        self._caught_up = False  # logged once per assignment

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop after the current batch: flush, commit, leave (safe from signals/threads)."""
        self._stopping.set()

    def run(
        self, *, stop_at_end: bool = False, install_signal_handlers: bool = True
    ) -> ArchiveStats:
        """Archive until stopped, or (`stop_at_end`) until every assigned partition is
        archived to its end. Everything buffered is flushed and committed before return."""
        # End-of-partition events: `stop_at_end`, and the "caught up" log line operators
        # (and tests) wait for.
        conf = self.kafka.consumer(self.group, **{"enable.partition.eof": True} | self._overrides)
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            [self.kafka.topic(t) for t in self.topics],
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost,
        )  # fmt: skip
        restore = install_stop_handlers(self._on_signal) if install_signal_handlers else None
        try:
            self._loop(stop_at_end)
            self._final_flush()
        finally:
            if restore:
                restore()
            consumer, self._consumer = self._consumer, None
            consumer.close()  # leaves the group
        return self.stats

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, stop_at_end: bool) -> None:
        consumer = self._consumer
        assert consumer is not None
        parts = self._parts
        while not self._stopping.is_set():
            for message in next_batch(consumer, self.batch_size, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        self._at_end.add((message.topic(), message.partition()))
                        if not self._caught_up and self._at_end >= parts.keys():
                            self._caught_up = True
                            log.info("archive: caught up with %d partitions", len(parts))
                    elif error.fatal():
                        raise TransientError(f"archive consumer: {error.str()}")
                    else:
                        log.warning("archive consumer: %s", error.str())
                    continue
                tp = (message.topic(), message.partition())
                part = parts.get(tp)
                if part is None:
                    continue  # revoked while this batch was in hand
                offset = message.offset()
                if offset < part.next_offset:
                    self.stats.skipped += 1  # archived already (see the module docstring)
                    continue
                self._add(tp, part, message)
                part.next_offset = offset + 1
                self._at_end.discard(tp)
            if self._due() and time.monotonic() >= self._retry_at:
                self._try_flush()
            if stop_at_end and parts and self._at_end >= parts.keys():
                return  # run() flushes what is buffered

    def _add(self, tp: tuple[str, int], part: _Partition, message: Consumed) -> None:
        kind, ts = message.timestamp()
        stamp = ts if kind else None
        pieces = part.pieces
        # A new file at each change of UTC date: every file lies in one date directory.
        if not pieces or not pieces[-1].accepts(stamp):
            pieces.append(_Piece(self.kafka.event_type(tp[0]), tp[1], stamp))
        piece = pieces[-1]
        before = piece.nbytes
        piece.add(message, stamp)
        self._buffered += piece.nbytes - before

    def _due(self) -> bool:
        if not self._buffered:
            return False
        if self._buffered >= self.flush_bytes:
            return True
        oldest = min(p.pieces[0].opened for p in self._parts.values() if p.pieces)
        return time.monotonic() - oldest >= self.flush_seconds

    def _try_flush(self) -> None:
        try:
            self.flush()
            self._failures = 0
        except TransientError as e:
            self._failures += 1
            delay = self.backoff.delay(self._failures)
            self._retry_at = time.monotonic() + delay
            log.warning("archive: flush failed (retrying in %.1fs): %s", delay, e)
            self._pause_while_failing()

    def _pause_while_failing(self) -> None:
        """Stop fetching while the store is failing, so memory does not grow; polling goes
        on (heartbeats), and records fetched before the pause are still buffered."""
        assert self._consumer is not None
        if self._buffered >= 2 * self.flush_bytes:
            self._consumer.pause([TopicPartition(t, p) for t, p in self._parts])

    def flush(self, only: Sequence[tuple[str, int]] | None = None) -> None:
        """Write every buffered piece (of `only` partitions) as a file, in offset order per
        partition, then commit the offsets after them. `TransientError` if the store fails:
        what was written stays written (and off the buffer), the rest is kept."""
        keys = list(self._parts) if only is None else [k for k in only if k in self._parts]
        done: dict[tuple[str, int], int] = {}
        try:
            for tp in keys:
                pieces = self._parts[tp].pieces
                while pieces:
                    piece = pieces[0]
                    key = file_key(piece.topic, piece.day, piece.partition, piece.first, piece.last)
                    size = write_piece(self.store, piece.table(), key)
                    pieces.pop(0)
                    self._buffered -= piece.nbytes
                    self.stats.records += len(piece.columns[0])
                    self.stats.files += 1
                    self.stats.bytes += size
                    done[tp] = piece.last + 1
        finally:
            self._commit(done)
        if self._failures and self._consumer is not None:
            self._consumer.resume([TopicPartition(t, p) for t, p in self._parts])

    def _commit(self, done: Mapping[tuple[str, int], int]) -> None:
        if not done or self._consumer is None:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in done.items()],
                asynchronous=False,
            )
            self.stats.commits += 1
        except KafkaException as e:
            # Harmless: positions come from the store, the commit only shows progress.
            log.warning("archive: commit failed (positions are kept on the store): %s", e)

    def _final_flush(self) -> None:
        for attempt in range(1, 6):
            try:
                self.flush()
                return
            except TransientError as e:
                if attempt == 5:
                    # Nothing of it was committed: the next run archives it (exactly once).
                    log.error("archive: giving up flushing at shutdown: %s", e)
                    return
                time.sleep(self.backoff.delay(attempt))

    # -- rebalances ------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        starts = self._high_water({self.kafka.event_type(tp.topic) for tp in partitions})
        for tp in partitions:
            start = starts.get((self.kafka.event_type(tp.topic), tp.partition))
            tp.offset = OFFSET_BEGINNING if start is None else start
            self._parts[(tp.topic, tp.partition)] = _Partition(next_offset=start or 0)
            self._at_end.discard((tp.topic, tp.partition))
        consumer.incremental_assign(partitions)
        self._caught_up = False
        log.info(
            "archive: assigned %s",
            ", ".join(f"{self.kafka.event_type(tp.topic)}/{tp.partition}@{tp.offset}"
                      for tp in partitions),
        )  # fmt: skip

    def _high_water(self, topics: set[str]) -> dict[tuple[str, int], int]:
        attempt = 0
        while True:
            try:
                return high_water(list_files(self.store, sorted(topics)))
            except TransientError as e:
                attempt += 1
                if attempt >= 8:
                    raise
                delay = self.backoff.delay(attempt)
                log.warning("archive: cannot list the archive (retrying in %.1fs): %s", delay, e)
                time.sleep(delay)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            self.flush(only=keys)  # hand over what is buffered, archived
        except TransientError as e:
            log.warning("archive: revoked partitions not flushed (the new owner re-reads): %s", e)
        self._forget(keys)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member owns them already: writing them now could only overlap its files.
        self._forget([(tp.topic, tp.partition) for tp in partitions])

    def _forget(self, keys: Sequence[tuple[str, int]]) -> None:
        for key in keys:
            part = self._parts.pop(key, None)
            if part is not None:
                self._buffered -= sum(p.nbytes for p in part.pieces)
            self._at_end.discard(key)

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("archive: %s received, flushing and stopping", signum.name)
        self.stop()
