"""The archiver (`mlbus archive run`): a consumer group over every contract topic that
writes each record, raw, to Parquet files on the object store (layout.py), flushing by size
and by time. Reads every topic of the catalog (dead letters included); writes no topic. The
consumer, the batching, the retries and the rebalances are the kernel's positioned loop
(mlbus/kafka/positioned.py); this module is its sink.

Exactly once per record — the file *is* the position:
- a file holds a run of consecutive offsets of one partition and is named after them
  (`p<partition>-<first>-<last>.parquet`); it appears whole or not at all (the store's
  staged write: temporary key, then a move);
- a partition's files are written in offset order, so what is on the store is always a
  prefix of the partition: its high-water mark is one past the largest `last` in the names;
- on every (re)assignment the archiver lists the partition's files and the loop seeks to
  that high-water mark (the beginning if there are none), whatever the group committed; so
  a crash after a file became durable and before the commit re-reads nothing it archived;
- the group's offsets are committed after the files are durable, never before; they serve
  lag monitoring and are never trusted over the store;
- a flush cut short by a failing store leaves its first files written: the retry skips
  what they hold.
- the last file's last record anchors the partition's log (mlbus/kafka/anchor.py): on
  assignment the loop reads the record at its offset back from Kafka; another record or none
  is a new log. Then `on_new_log` "fail" stops the archiver with `NewLog`; "rebuild" and
  "restart" (the same here: the archive is rebuilt by archiving the new log) move the
  partition's files to a retired log (layout.py `retire`) before the new log is archived
  from its beginning, so two logs are never spliced in one file sequence.
A revoked partition's buffer is flushed before it is handed over; a *lost* one (another
member already owns it) is dropped unwritten. Should two members still overlap (a zombie
past its session), they write the same records under different cuts, never different
records under one name, and the reader skips offsets it has already yielded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlbus.consumers.archive import DEFAULT_GROUP
from mlbus.consumers.archive.layout import (
    NO_DATE,
    ArchiveFile,
    archive_table,
    day_of,
    file_key,
    high_water,
    list_files,
    retire,
)
from mlbus.kafka.anchor import ON_NEW_LOG, Anchor, Position
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Backoff, Consumed
from mlbus.kafka.positioned import Batch, Partition, PositionedLoop
from mlbus.schemas.catalog import TOPICS, topic
from mlbus.storage import ObjectStore, StorageError, translated

if TYPE_CHECKING:  # pyarrow loads with the first file written or read: an idle archiver is light
    import pyarrow as pa

DAY_MS = 24 * 3600 * 1000
#: Retries of a failing object store: patient, the records wait in Kafka meanwhile.
STORE_BACKOFF = Backoff(initial=0.5, maximum=30.0)


@dataclass
class ArchiveStats:
    records: int = 0
    files: int = 0
    bytes: int = 0  # Parquet bytes written
    commits: int = 0
    skipped: int = 0  # records below the archive's high-water mark (already archived)
    retired: int = 0  # files moved to a retired log (a partition found on a new log)


class _Piece:
    """Consecutive records of one partition on one UTC date: one file."""

    __slots__ = ("columns", "day", "hi", "lo", "partition", "topic")

    def __init__(self, topic: str, partition: int, timestamp_ms: int | None) -> None:
        self.topic = topic
        self.partition = partition
        self.day = day_of(timestamp_ms)
        if timestamp_ms is None:
            self.lo, self.hi = -1, -1
        else:  # the day's bounds, so that a record's date is two integer comparisons
            self.lo = timestamp_ms - timestamp_ms % DAY_MS
            self.hi = self.lo + DAY_MS
        self.columns: tuple[list[Any], ...] = ([], [], [], [], [])  # offset ts key hdrs value

    def accepts(self, timestamp_ms: int | None) -> bool:
        if timestamp_ms is None:
            return self.day == NO_DATE
        return self.lo <= timestamp_ms < self.hi

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


def pieces(topic: str, partition: int, messages: Sequence[Consumed]) -> list[_Piece]:
    """`messages` (one partition, offset order) cut into files: a new file at each change
    of UTC date, so that every file lies in one date directory."""
    cut: list[_Piece] = []
    piece: _Piece | None = None
    for message in messages:
        kind, ts = message.timestamp()
        stamp = ts if kind else None
        if piece is None or not piece.accepts(stamp):
            piece = _Piece(topic, partition, stamp)
            cut.append(piece)
            offsets, stamps, keys, headers, values = piece.columns
        offsets.append(message.offset())
        stamps.append(stamp)
        keys.append(message.key())
        headers.append(message.headers())
        values.append(message.value())
    return cut


def write_piece(store: ObjectStore, table: pa.Table, key: str) -> int:
    """Write one archive file atomically (staged, then moved into place); its size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    with store.staged(key) as out:
        out.write(memoryview(data))
    return data.size


def last_record(store: ObjectStore, f: ArchiveFile) -> Anchor:
    """The anchor of the last record of `f` (the row at offset `f.last`), read from its last
    row group only."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with translated(f"reading {store.uri(f.key)}"), store.open(f.key) as handle:
        parquet = pq.ParquetFile(handle)
        group = parquet.read_row_group(
            parquet.num_row_groups - 1, columns=["offset", "timestamp", "key", "value"]
        )
    row = group.filter(pc.equal(group.column("offset"), f.last))
    if not row.num_rows:
        raise StorageError(f"{store.uri(f.key)}: no record at offset {f.last}, as its name says")
    at = row.num_rows - 1
    return Anchor.of(
        f.last,
        row.column("key")[at].as_py(),
        row.column("value")[at].as_py(),
        row.column("timestamp").cast(pa.int64())[at].as_py(),
    )


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
        on_new_log: str = "fail",
    ) -> None:
        if on_new_log not in ON_NEW_LOG:
            raise ValueError(f"on_new_log {on_new_log!r}: one of {', '.join(ON_NEW_LOG)}")
        self.kafka = kafka
        self.store = store
        self.group = group
        self.topics = list(topics) if topics is not None else list(TOPICS)
        for name in self.topics:
            topic(name)  # UnknownTopic, naming the contract's topics
        self.stats = ArchiveStats()
        self._archived: dict[Partition, int] = {}  # the high-water mark of each partition
        self.loop = PositionedLoop(
            kafka,
            self,
            group=group,
            topics=self.topics,
            name="archive",
            batch_size=batch_size,
            max_bytes=flush_bytes,
            max_seconds=flush_seconds,
            backoff=backoff,
            consumer_overrides=consumer_overrides,
            on_new_log="fail" if on_new_log == "fail" else "restart",
        )

    def stop(self) -> None:
        """Stop after the current batch: flush, commit, leave (safe from signals/threads)."""
        self.loop.stop()

    def run(
        self, *, stop_at_end: bool = False, install_signal_handlers: bool = True
    ) -> ArchiveStats:
        """Archive until stopped, or (`stop_at_end`) until every assigned partition is
        archived to its end. Everything buffered is flushed and committed before return."""
        loop = self.loop.run(
            stop_at_end=stop_at_end, install_signal_handlers=install_signal_handlers
        )
        self.stats.commits = loop.commits
        self.stats.skipped = loop.skipped
        return self.stats

    # -- the positioned loop's sink --------------------------------------------------------

    def positions(self, partitions: Sequence[Partition]) -> Mapping[Partition, int | Position]:
        """The archive's high-water mark of each partition that has files, anchored by the
        last record archived (read back from the newest file)."""
        files = list_files(self.store, sorted({t for t, _ in partitions}))
        marks = high_water(files)
        newest = {
            (f.topic, f.partition): f for f in files if f.last + 1 == marks[f.topic, f.partition]
        }
        found: dict[Partition, int | Position] = {}
        for p in partitions:
            self._archived[p] = marks.get(p, 0)
            if p in marks:
                found[p] = Position(marks[p], last_record(self.store, newest[p]))
        return found

    def restart(self, partition: Partition, old: Anchor) -> None:
        """A new log in `partition`: its files move to a retired log named after `old` (the
        last record archived), and the new log is archived from its beginning."""
        topic_name, number = partition
        files = [f for f in list_files(self.store, [topic_name]) if f.partition == number]
        retire(self.store, files, old.digest[:16])
        self._archived[partition] = 0
        self.stats.retired += len(files)

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        """Each partition's records as files, in offset order (the names are the position).
        `TransientError` if the store fails: the files written stay written, and the retry
        of the batch skips what they hold."""
        for key, messages in batch.items():
            done = self._archived.get(key, 0)
            if messages[0].offset() < done:  # written before a failure cut a flush short
                messages = [m for m in messages if m.offset() >= done]
            for piece in pieces(key[0], key[1], messages):
                name = file_key(piece.topic, piece.day, piece.partition, piece.first, piece.last)
                size = write_piece(self.store, piece.table(), name)
                self._archived[key] = piece.last + 1
                self.stats.records += len(piece.columns[0])
                self.stats.files += 1
                self.stats.bytes += size

    def release(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        for p in partitions:
            self._archived.pop(p, None)
