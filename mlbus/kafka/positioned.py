"""The positioned batch loop: a consumer group whose position lives in its sink (SQL rows,
file names on the object store), not in Kafka. Used by the consumers that keep state outside
Kafka and must apply each record exactly once: the lineage projector and the archiver. Reads
the topics it is given; writes none.

The one place that commits. A checkpoint is, in order:
1. `Sink.write(batch, positions)`: the buffered records and the position after them, made
   durable *together* by the sink (one SQL transaction; files named by their offsets);
2. the same positions committed to Kafka: informational only (lag tools), never read back.
A write that raises commits nothing and keeps the batch: `TransientError` is retried with
backoff while the loop stays in its group; anything else ends `run`, and the next run reads
the batch again from the sink's positions.

On every (re)assignment each partition is sought to the position `Sink.positions` returns
(its beginning when the sink has none), whatever the group committed; so a crash between a
write and its Kafka commit re-reads nothing the sink holds. A position that comes with an
anchor (anchor.py) is checked first: the partition is sought to the anchor's offset, and the
record found there must be the anchor's. If it is not, the log is a new one: `on_new_log`
"fail" raises `NewLog` (nothing of that partition is handed to the sink), "restart" calls
`Sink.restart` (the sink sets aside what it holds of the old log) and reads the partition
from its beginning. A log that ends before the anchor's offset is new as well (told by the
fetch's high-water mark where the broker answers such a fetch with nothing; docs/broker.md).

A revoked partition's buffer is written before it is handed over; a lost one (another member
owns it already) is dropped unwritten. Records below a partition's position are skipped,
never handed to the sink. Undecodable records are the sink's business (the archiver keeps
them raw, the projector records them as skipped): nothing is dead-lettered here.

Batches are cut by size and age: with neither limit set every poll is written at once.
SIGTERM/SIGINT finish the current batch, write what is buffered, commit and leave the group.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from mlbus.errors import TransientError
from mlbus.kafka import observed
from mlbus.kafka.anchor import Anchor, NewLog, Position
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Backoff, Consumed, next_batch
from mlbus.kafka.quiet import Quiet
from mlbus.signals import install_stop_handlers

log = logging.getLogger(__name__)

#: A partition as sinks see it: (event type, i.e. the topic without the prefix, partition).
Partition = tuple[str, int]
#: The records of one write by partition, each list in offset order.
Batch = Mapping[Partition, list[Consumed]]

_EOF = KafkaError._PARTITION_EOF
#: Bytes a buffered record is counted for beyond its key and value (offsets, headers, lists).
RECORD_OVERHEAD = 64
#: Attempts at reading the sink's positions on assignment, and at the final write on stop.
ASSIGN_ATTEMPTS = 8
FINAL_ATTEMPTS = 5
#: Retries of a failing write (the sink's own choice may be more patient).
WRITE_BACKOFF = Backoff()


class Sink(Protocol):
    """Where a positioned loop's records go, and where its positions are kept."""

    def positions(self, partitions: Sequence[Partition]) -> Mapping[Partition, int | Position]:
        """The next offset to read of each of `partitions` (newly assigned), with the anchor
        of its log when the sink keeps one (`Position`); a partition left out starts at its
        beginning. `TransientError` is retried with backoff."""
        ...

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        """Make `batch` and `positions` (the offset after each partition's last record)
        durable together, or raise. After a `TransientError` the loop calls again with the
        same records, perhaps followed by newer ones: a sink that made part of a batch
        durable before failing skips that part itself."""
        ...

    def release(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        """`partitions` are no longer this member's (revoked after their buffer was
        written, or `lost`: dropped unwritten); forget what is kept about them."""
        ...


class Restartable(Protocol):
    """A sink that can continue a partition from the beginning of a new log
    (`on_new_log="restart"`)."""

    def restart(self, partition: Partition, old: Anchor) -> None:
        """`partition`'s log is a new one; `old` anchors what the sink holds of the old log.
        Make the sink hold no position of `partition` any more (durably: a crash before the
        next write must not bring the old position back), setting aside, not splicing, what
        it holds of the old log. Raising ends `run`; the next run detects the new log again."""
        ...


@dataclass
class PositionedStats:
    records: int = 0  # records written
    writes: int = 0
    commits: int = 0  # Kafka commits (informational)
    skipped: int = 0  # records below their partition's position (the sink has them)
    retries: int = 0  # writes that raised TransientError
    new_logs: int = 0  # partitions found on a new log and restarted from their beginning


class _Part:
    """One assigned partition: the records buffered and the offset after them."""

    __slots__ = ("at_end", "key", "next", "records", "tp", "verify", "written")

    def __init__(
        self, tp: tuple[str, int], key: Partition, start: int | None, verify: Anchor | None = None
    ) -> None:
        self.tp = tp  # (Kafka topic, partition)
        self.key = key  # (event type, partition)
        self.next = start if start is not None else 0  # first offset not yet taken
        self.written = start  # the position the sink holds; None: nothing yet
        self.records: list[Consumed] = []
        self.at_end = False
        self.verify = verify  # the anchor still to be found at its offset


class PositionedLoop:
    """Consume `topics` (contract names) in consumer group `group` into `sink`.

    `max_bytes` and `max_seconds` cut batches: a write happens once the buffer holds
    `max_bytes` (key and value bytes plus `RECORD_OVERHEAD` a record) or its oldest record
    has waited `max_seconds`; with neither set, each poll of up to `batch_size` records is
    written at once. `on_new_log` ("fail" or "restart") is what a partition found on a new
    log does (the module docstring); "restart" needs a sink with `restart` (`Restartable`).
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        sink: Sink,
        *,
        group: str,
        topics: Sequence[str],
        name: str = "positioned",
        batch_size: int = 5000,
        max_bytes: int | None = None,
        max_seconds: float = 0.0,
        poll_timeout: float = 0.5,
        backoff: Backoff = WRITE_BACKOFF,
        consumer_overrides: Mapping[str, Any] | None = None,
        on_new_log: str = "fail",
    ) -> None:
        if on_new_log not in ("fail", "restart"):
            raise ValueError(f"on_new_log {on_new_log!r}: the loop fails or restarts")
        if on_new_log == "restart" and not hasattr(sink, "restart"):
            raise ValueError(f"{name}: its sink cannot restart a partition on a new log")
        self.on_new_log = on_new_log
        self.kafka = kafka
        self.sink = sink
        self.group = group
        self.topics = list(topics)
        self.name = name
        self.batch_size = batch_size
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.poll_timeout = poll_timeout
        self.backoff = backoff
        self.stats = PositionedStats()
        observed.watch(self)  # its counts on /metrics
        #: set once every assigned partition has been read to its end (records may still
        #: be buffered then)
        self.caught_up = threading.Event()
        self._overrides = dict(consumer_overrides or {})
        self._consumer: Consumer | None = None
        self._cooperative = True
        self._parts: dict[tuple[str, int], _Part] = {}  # by (Kafka topic, partition)
        self._buffered = 0  # records
        self._bytes = 0
        self._oldest = 0.0  # when the oldest buffered record was taken
        self._failures = 0
        self._retry_at = 0.0
        self._paused = False
        self._logged_caught_up = False  # once per assignment
        self._verifying = False  # some partition's anchor is still to be checked
        self._stopping = threading.Event()
        self._quiet = Quiet(kafka.journal)  # no fetching while idle (mlbus/kafka/quiet.py)

    # -- control ---------------------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """True while it polls without fetching, idle (mlbus/kafka/quiet.py)."""
        return self._quiet.quiet

    def stop(self) -> None:
        """Stop after the current batch: write, commit, leave (safe from signals/threads)."""
        self._stopping.set()

    def run(
        self, *, stop_at_end: bool = False, install_signal_handlers: bool = True
    ) -> PositionedStats:
        """Run until stopped, or (`stop_at_end`) until every assigned partition is read to
        its end. What is buffered is written and committed before it returns."""
        conf = self.kafka.consumer(self.group, **{"enable.partition.eof": True} | self._overrides)
        conf["on_commit"] = self._on_commit
        self._cooperative = "cooperative" in str(conf.get("partition.assignment.strategy", ""))
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            [self.kafka.topic(t) for t in self.topics],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        restore = install_stop_handlers(self._on_signal) if install_signal_handlers else None
        try:
            self._loop(stop_at_end)
            self._final_write()
        finally:
            if restore:
                restore()
            # Closing revokes the assignment: what is still buffered now (the final write
            # gave up, or an error ends the run) must not be written by the revocation.
            for part in self._parts.values():
                part.records = []
            self._buffered = self._bytes = 0
            consumer, self._consumer = self._consumer, None
            try:
                consumer.close()  # leaves the group
            except KafkaException as e:  # the positions are in the sink
                log.warning("%s: closing the consumer: %s", self.name, e)
        return self.stats

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, stop_at_end: bool) -> None:
        consumer = self._consumer
        assert consumer is not None
        parts = self._parts
        sizing = self.max_bytes is not None
        while not self._stopping.is_set():
            # The per-record work of both services is this loop: kept to attribute reads.
            taken = 0
            size = 0
            restarted: set[tuple[str, int]] = set()  # this batch's rest of them is stale
            wait = self._quiet.poll_timeout(self.poll_timeout)
            batch = next_batch(consumer, self.batch_size, wait)
            for message in batch:
                error = message.error()
                if error is not None:
                    self._on_message_error(message, error, restarted)
                    continue
                tp = (message.topic(), message.partition())
                part = parts.get(tp)
                if part is None or tp in restarted:
                    continue  # revoked while this batch was in hand: the new owner reads it
                if part.verify is not None:  # the first record read is the anchor's, or not
                    self._check(part, Anchor.of_message(message), restarted)
                    continue  # below the position (the sink has it), or stale after a restart
                offset = message.offset()
                if offset < part.next:
                    self.stats.skipped += 1  # the sink has it (see the module docstring)
                    continue
                part.next = offset + 1
                part.at_end = False
                part.records.append(message)
                taken += 1
                if sizing:
                    key, value = message.key(), message.value()
                    size += (
                        RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
                    )
            if taken:
                if not self._buffered:
                    self._oldest = time.monotonic()
                self._buffered += taken
                self._bytes += size
            if self._verifying:
                self._ends_before_anchors(restarted)
            if self._due() and time.monotonic() >= self._retry_at:
                self._try_write()
            if parts and all(p.at_end for p in parts.values()):
                if not self._logged_caught_up:
                    self._logged_caught_up = True
                    log.info(
                        "%s: caught up with %d partitions (%d records written)",
                        self.name,
                        len(parts),
                        self.stats.records,
                    )
                self.caught_up.set()
                if stop_at_end:
                    return  # run() writes what is buffered
            if not self._paused:  # a failing sink holds the partitions paused itself
                self._quiet.step(consumer, bool(batch), lambda: list(parts), self._next)

    def _next(self) -> dict[tuple[str, int], int] | None:
        """The next offset of each assigned partition, once every one is read to its end
        and its anchor checked (None before: the loop keeps fetching)."""
        parts = self._parts
        if self._verifying or not parts or not all(p.at_end for p in parts.values()):
            return None
        return {tp: p.next for tp, p in parts.items()}

    def _due(self) -> bool:
        if not self._buffered:
            return False
        if self.max_bytes is not None and self._bytes >= self.max_bytes:
            return True
        return time.monotonic() - self._oldest >= self.max_seconds

    def _try_write(self) -> None:
        try:
            written = self._write(list(self._parts.values()))
        except TransientError as e:
            self._failures += 1
            self.stats.retries += 1
            delay = self.backoff.delay(self._failures)
            self._retry_at = time.monotonic() + delay
            log.warning("%s: write failed (retrying in %.1fs): %s", self.name, delay, e)
            # Stop fetching while the sink fails, so the buffer does not grow; polling goes
            # on (heartbeats, rebalances), and records fetched before the pause are kept.
            if not self._paused and (self.max_bytes is None or self._bytes >= 2 * self.max_bytes):
                assert self._consumer is not None
                self._consumer.pause([TopicPartition(*p.tp) for p in self._parts.values()])
                self._paused = True
                self._quiet.woken()  # paused by the sink now: resumed when it writes again
            return
        self._commit(written, asynchronous=True)
        self._failures = 0
        self._retry_at = 0.0
        if self._paused and self._consumer is not None:
            self._consumer.resume([TopicPartition(*p.tp) for p in self._parts.values()])
            self._paused = False

    def _write(self, parts: Sequence[_Part]) -> list[_Part]:
        """Step 1 of a checkpoint: the sink writes the records of `parts` and the positions
        after them. Raises what the sink raised, with nothing changed; returns the parts
        written, whose positions the caller commits to Kafka (step 2)."""
        full = [p for p in parts if p.records]
        if not full:
            return []
        self.sink.write({p.key: p.records for p in full}, {p.key: p.next for p in full})
        records = 0
        for p in full:
            records += len(p.records)
            p.records = []
            p.written = p.next
        self.stats.records += records
        self.stats.writes += 1
        self._buffered -= records
        self._recount()
        return full

    def _recount(self) -> None:
        """Buffered bytes after part of the buffer left it (rare: revocations)."""
        if not self._buffered:
            self._bytes = 0
        elif self.max_bytes is not None:
            self._bytes = sum(_size(m) for p in self._parts.values() for m in p.records)

    def _commit(self, parts: Sequence[_Part], *, asynchronous: bool) -> None:
        """Step 2 of a checkpoint: the positions the sink holds, committed to Kafka."""
        offsets = [TopicPartition(*p.tp, p.written) for p in parts if p.written is not None]
        if not offsets or self._consumer is None:
            return
        try:
            if asynchronous:
                self._consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
        except KafkaException as e:  # e.g. revoked meanwhile; harmless: the sink holds the truth
            log.warning("%s: commit failed (the positions are kept by the sink): %s", self.name, e)

    def _final_write(self) -> None:
        for attempt in range(1, FINAL_ATTEMPTS + 1):
            try:
                self._write(list(self._parts.values()))
                break
            except TransientError as e:
                if attempt == FINAL_ATTEMPTS:
                    # Nothing of it was committed: the next run reads it again (exactly once).
                    log.error("%s: giving up writing at shutdown: %s", self.name, e)
                    break
                time.sleep(self.backoff.delay(attempt))
        # one synchronous commit of every position, which also confirms the asynchronous ones
        self._commit(list(self._parts.values()), asynchronous=False)

    def _on_message_error(
        self, message: Consumed, error: KafkaError, restarted: set[tuple[str, int]]
    ) -> None:
        if error.code() == _EOF:
            tp = (message.topic(), message.partition())
            part = self._parts.get(tp)
            if part is not None and tp not in restarted:
                if part.verify is not None:  # the log ends before the anchor
                    self._check(part, None, restarted)
                else:
                    part.at_end = True
        elif error.fatal():
            raise TransientError(f"{self.name} consumer: {error.str()}")
        else:
            log.warning("%s consumer: %s", self.name, error.str())

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            log.warning(
                "%s: commit failed (the positions are kept by the sink): %s", self.name, error.str()
            )

    # -- log identity ----------------------------------------------------------------------

    def _check(self, part: _Part, found: Anchor | None, restarted: set[tuple[str, int]]) -> None:
        """`found`: the first record read of a partition sought to its anchor (None: its
        end came first). The same record: the same log. Otherwise `NewLog`, or a restart."""
        anchor = part.verify
        assert anchor is not None
        if found == anchor:
            part.verify = None
            return
        error = NewLog(self.name, part.key[0], part.key[1], anchor, found)
        if self.on_new_log != "restart":
            raise error
        log.warning("%s; restarting it from its beginning (on_new_log=restart)", error)
        self.sink.restart(part.key, anchor)  # type: ignore[attr-defined]  # checked in __init__
        self.stats.new_logs += 1
        part.verify = None
        part.next = 0
        part.written = None
        part.at_end = False
        restarted.add(part.tp)
        assert self._consumer is not None
        self._consumer.seek(TopicPartition(*part.tp, OFFSET_BEGINNING))

    def _ends_before_anchors(self, restarted: set[tuple[str, int]]) -> None:
        """Partitions whose log ends at or before their anchor's offset: a new log. Apache
        Kafka answers a fetch past the end with OFFSET_OUT_OF_RANGE (then the reset to the
        beginning brings a record that is not the anchor's); the embedded broker answers
        nothing at all, but its fetch responses carry the right high-water mark, which
        librdkafka caches (docs/broker.md). In the same log the anchor lies below it."""
        consumer = self._consumer
        assert consumer is not None
        for part in [p for p in self._parts.values() if p.verify is not None]:
            try:
                _, high = consumer.get_watermark_offsets(TopicPartition(*part.tp), cached=True)
            except KafkaException:
                continue  # nothing fetched yet
            if part.verify is not None and 0 <= high <= part.verify.offset:
                self._check(part, None, restarted)
        self._verifying = any(p.verify is not None for p in self._parts.values())

    # -- rebalances: positions come from the sink ------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._quiet.resume(consumer)
        keys = [(self.kafka.event_type(tp.topic), tp.partition) for tp in partitions]
        found = self._positions(keys)
        starts: dict[Partition, int] = {}
        for tp, key in zip(partitions, keys, strict=True):
            position = found.get(key)
            if isinstance(position, int):
                position = Position(position)
            start = anchor = None
            if position is not None:
                start, anchor = position.next, position.anchor
                starts[key] = start
                if anchor is None:
                    log.warning(
                        "%s: %s/%d: position %d has no log anchor (stored before anchors "
                        "were kept): assumed to belong to this log",
                        self.name,
                        *key,
                        start,
                    )
                elif anchor.offset >= start:  # a sink's defect: anchors lie below positions
                    raise ValueError(f"{self.name}: {key}: anchor {anchor} at/after {start}")
            # sought to the anchor, whose record is read back and compared before the rest
            tp.offset = OFFSET_BEGINNING if start is None else anchor.offset if anchor else start
            self._parts[(tp.topic, tp.partition)] = _Part(
                (tp.topic, tp.partition), key, start, anchor
            )
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:  # eager: `partitions` is the whole assignment
            consumer.assign(partitions)
        self._logged_caught_up = False
        self._verifying = any(p.verify is not None for p in self._parts.values())
        log.info(
            "%s: assigned %s",
            self.name,
            ", ".join(f"{t}/{p}@{starts.get((t, p), 0)}" for t, p in keys) or "nothing",
        )

    def _positions(self, keys: list[Partition]) -> Mapping[Partition, int | Position]:
        attempt = 0
        while True:
            try:
                return self.sink.positions(keys)
            except TransientError as e:
                attempt += 1
                if attempt >= ASSIGN_ATTEMPTS:
                    raise
                delay = self.backoff.delay(attempt)
                log.warning(
                    "%s: cannot read the positions (retrying in %.1fs): %s", self.name, delay, e
                )
                time.sleep(delay)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._quiet.resume(consumer)  # the partitions it keeps fetch again
        parts = self._owned(partitions)
        try:
            self._commit(self._write(parts), asynchronous=False)  # hand over what is buffered
        except TransientError as e:
            log.warning(
                "%s: revoked partitions not written (the new owner reads them): %s", self.name, e
            )
        self._forget(consumer, partitions, parts, lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._quiet.resume(consumer)
        # Another member owns them already: writing them now could only overlap its writes.
        self._forget(consumer, partitions, self._owned(partitions), lost=True)

    def _owned(self, partitions: list[TopicPartition]) -> list[_Part]:
        return [p for tp in partitions if (p := self._parts.get((tp.topic, tp.partition)))]

    def _forget(
        self,
        consumer: Consumer,
        partitions: list[TopicPartition],
        parts: list[_Part],
        *,
        lost: bool,
    ) -> None:
        for p in parts:
            del self._parts[p.tp]
            self._buffered -= len(p.records)
        self._recount()
        self.sink.release([p.key for p in parts], lost=lost)
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("%s: %s received, stopping after the current batch", self.name, signum.name)
        self.stop()


def _size(message: Consumed) -> int:
    key, value = message.key(), message.value()
    return RECORD_OVERHEAD + (len(key) if key else 0) + (len(value) if value else 0)
