"""Between faust and the window engine: decode each `inference.logged` record (bad ones to
`mlbus.deadletter`, as the kernel's ConsumerLoop does), apply it in partition order, then
publish the closed windows' `serving.metrics` / `serving.alert` and persist the changed
state to the faust table's changelog.

Guarantees: at-least-once with idempotent effects. Per batch, outputs are confirmed by the
broker first, then the state is written to the changelog, then the input offsets are
committed (streams/transport.py, after the batch). A restart re-reads from the committed offset:
records at or below a series' stored offset only move stream time (no double counting), and
outputs carry deterministic ids, so one that is published twice is one event to consumers.

Log identity (mlbus/kafka/anchor.py): the state also keeps, per partition, the anchor of the
last record applied. Before a partition's first batch after an assignment the record at the
anchor's offset is compared with it (from the batch when it holds that offset, else read back
with a group-less consumer); another record, or none, means `inference.logged` is a new log
whose records the stored series offsets would skip. `positions.on_new_log` decides: `fail`
raises `NewLog`, which stops the app; `restart` (and `rebuild`, the same here) resets the
partition's series offsets and folds the new log from offset 0 (docs/streams.md).

Outputs go through the kernel's confluent `EventProducer` rather than faust's aiokafka
producer: it is idempotent with acks=all (aiokafka idempotence fails on the embedded broker,
docs/broker.md), encodes with the one codec, and the dead-letter path is the kernel's.
Its flush runs in a thread so the event loop (heartbeats) keeps going.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from mlbus.errors import DeliveryError, InvalidEvent, TransientError
from mlbus.kafka.anchor import Anchor, NewLog
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Consumed
from mlbus.kafka.deadletter import dead_letter, dead_letter_headers
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import decode_dict
from mlbus.streams.exporter import Exporter
from mlbus.streams.logged import logged_decoder
from mlbus.streams.windows import Engine

log = logging.getLogger(__name__)

EVENT_TYPE = "inference.logged"
NAME = "streams"
#: Records applied between two turns of the event loop (see `StreamProcessor.handle`).
CHUNK = 5000


class StateTable(Protocol):
    """What the processor needs of a faust Table: its local data and its changelog."""

    @property
    def data(self) -> Any: ...

    def send_changelog(self, partition: int | None, key: Any, value: Any) -> Any: ...


class RawMessage(Protocol):
    """A fetched record (aiokafka's `ConsumerRecord`: the fields the processor reads)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None  # milliseconds
    key: bytes | None
    value: bytes | None
    headers: Any


class _AsConfluent:
    """A faust message seen as the confluent `Message` the kernel's `dead_letter` reads."""

    def __init__(self, message: RawMessage) -> None:
        self._m = message

    def value(self) -> bytes | None:
        return self._m.value

    def key(self) -> bytes | None:
        return self._m.key

    def headers(self) -> list[tuple[str, bytes | None]]:
        headers = self._m.headers or []
        items = headers.items() if isinstance(headers, dict) else headers
        return [(k, v) for k, v in items]

    def topic(self) -> str:
        return self._m.topic

    def partition(self) -> int:
        return self._m.partition

    def offset(self) -> int:
        return self._m.offset

    def timestamp(self) -> tuple[int, int | None]:
        ts = self._m.timestamp
        return (1, ts) if ts is not None else (0, None)


def series_key(key: str) -> str:
    return "s|" + key


def watermark_key(partition: int) -> str:
    return f"w|{partition}"


def anchor_key(partition: int) -> str:
    return f"a|{partition}"


_GONE = (KafkaError._PARTITION_EOF, KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE)
#: Seconds the read-back of an anchor's record may take before the check gives up.
ANCHOR_READ_SECONDS = 15.0


def record_anchor(message: RawMessage) -> Anchor:
    ts = message.timestamp
    return Anchor.of(
        message.offset, message.key, message.value, ts if ts is not None and ts >= 0 else None
    )


def read_anchor(
    kafka: KafkaConfig, topic: str, partition: int, offset: int, timeout: float
) -> Anchor | None:
    """The anchor of the first record at or after `offset` (None: the log ends before it),
    read by a group-less consumer that commits nothing. Blocking: run it in a thread."""
    conf = kafka.consumer(None, **{"enable.partition.eof": True, "auto.offset.reset": "error"})
    consumer = Consumer(conf)
    tp = TopicPartition(topic, partition)
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None:
                # The embedded broker answers a fetch past the end with nothing, but with the
                # right high-water mark (docs/broker.md); Kafka answers OFFSET_OUT_OF_RANGE.
                try:
                    _, high = consumer.get_watermark_offsets(tp, cached=True)
                except KafkaException:
                    continue
                if 0 <= high <= offset:
                    return None
                continue
            error = message.error()
            if error is None:
                return Anchor.of_message(cast("Consumed", message))
            if error.code() in _GONE:  # the log ends before `offset` (or starts after it)
                return None
            if error.fatal() or not error.retriable():
                raise TransientError(f"reading {topic}/{partition}@{offset}: {error.str()}")
        raise TransientError(f"{topic}/{partition}: offset {offset} not read in {timeout:.0f}s")
    finally:
        consumer.close()


class StreamProcessor:
    def __init__(
        self,
        kafka: KafkaConfig,
        engine: Engine,
        table: StateTable,
        exporter: Exporter,
        *,
        group: str,
        producer: EventProducer | None = None,
        on_new_log: str = "fail",
    ) -> None:
        if on_new_log not in ("fail", "rebuild", "restart"):
            raise ValueError(f"on_new_log {on_new_log!r}: fail, rebuild or restart")
        self.on_new_log = on_new_log
        self.kafka = kafka
        self.engine = engine
        self.table = table
        self.exporter = exporter
        self.group = group
        self.producer = producer or EventProducer(kafka, source=f"mlbus/{NAME}")
        self.lock = asyncio.Lock()
        self._restored: set[int] = set()
        self._last_record: dict[int, float] = {}  # partition → wall time of its last record
        self._last_offset: dict[int, int] = {}  # partition → offset of its last record
        self._last_message: dict[int, RawMessage] = {}  # partition → its last record
        self._verified: set[int] = set()  # partitions whose log was checked since assigned
        self.new_logs = 0  # partitions found on a new log and restarted
        self._pending = False
        self._revocations = 0  # revocations seen: a batch being applied stops at one
        self.processed = 0
        self.deadlettered = 0
        self._decode = logged_decoder(kafka.max_event_bytes)

    # -- the agent's batches ---------------------------------------------------------------

    async def verify(self, batches: dict[int, list[RawMessage]]) -> set[int]:
        """Check the log of each partition seen for the first time since its assignment
        (`batches`: its records of this fetch, in offset order) against its stored anchor.
        Returns the partitions whose records must be dropped: restarted on a new log and
        sought back to offset 0 (their committed offsets were the old log's)."""
        drop: set[int] = set()
        async with self.lock:
            for partition, records in batches.items():
                if partition in self._verified or not records:
                    continue
                raw = self.table.data.get(anchor_key(partition))
                if raw is None or raw.get("o", -1) < 0:
                    self._verified.add(partition)  # nothing stored yet, or just restarted
                    continue
                anchor = Anchor(raw["o"], raw["d"])
                found = await self._found(partition, records, anchor.offset)
                if found == anchor:
                    self._verified.add(partition)
                    continue
                error = NewLog(NAME, EVENT_TYPE, partition, anchor, found)
                if self.on_new_log == "fail":
                    log.error("%s", error)
                    raise error
                log.warning("%s; folding it from offset 0 (on_new_log=%s)", error, self.on_new_log)
                await self._restart(partition)
                self.new_logs += 1
                self._verified.add(partition)
                if records[0].offset > 0 and await self._rewind(partition):
                    drop.add(partition)
        return drop

    async def _found(
        self, partition: int, records: Sequence[RawMessage], offset: int
    ) -> Anchor | None:
        """The record at `offset` (or the first after it): from the batch, else read back."""
        if records[0].offset <= offset <= records[-1].offset:
            for message in records:
                if message.offset >= offset:
                    return record_anchor(message)
        topic = records[0].topic
        return await asyncio.get_running_loop().run_in_executor(
            None, read_anchor, self.kafka, topic, partition, offset, ANCHOR_READ_SECONDS
        )

    async def _restart(self, partition: int) -> None:
        """Forget the partition's series offsets (what else it holds stays: windows, alert
        state, stream time) and its anchor, durably before any record of the new log is
        applied: a crash then re-detects nothing and double counts nothing."""
        table = self.table
        for key, value in list(table.data.items()):
            if key.startswith("s|") and value.get("p") == partition and value.get("o", -1) >= 0:
                value = dict(value, o=-1)
                table.data[key] = value
                table.send_changelog(partition, key, value)
        marker = {"o": -1}  # no anchor: the state holds no position in any log
        table.data[anchor_key(partition)] = marker
        table.send_changelog(partition, anchor_key(partition), marker)
        await self._flush_changelog()

    async def _rewind(self, partition: int) -> bool:
        """Seek the partition back to offset 0 (the faust app does); True if done."""
        return False

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        """Apply `messages` (one fetch, in offset order per partition), then make the effects
        durable once: outputs, then the changelog; the caller commits the offsets after.

        A catching-up fetch holds tens of thousands of records: they are applied CHUNK at a
        time, with the event loop let run between chunks (faust's timers, the idle tick, the
        exporter's callbacks), so that none of them waits for the whole fetch. If partitions
        are revoked meanwhile, the rest is not applied: the revoked partitions' state is
        forgotten (their new owner restores it from the changelog and reads again from the
        committed offset, which this fetch does not move: faust stops the flow before it
        revokes, and the transport commits only while the flow runs)."""
        async with self.lock:
            revocations = self._revocations
            for start in range(0, len(messages), CHUNK):
                if start:
                    await asyncio.sleep(0)
                    if self._revocations != revocations:
                        break
                self.apply(messages[start : start + CHUNK])
            await self.commit_effects()

    def apply(self, messages: Iterable[RawMessage]) -> None:
        """Decode and apply records in order (synchronous: the hot path)."""
        apply = self.engine.apply
        decode = self._decode
        now = time.monotonic()
        max_bytes = self.kafka.max_event_bytes
        last_record, last_offset = self._last_record, self._last_offset
        last_message = self._last_message
        restored = self._restored
        processed = 0
        for message in messages:
            partition = message.partition
            if partition not in restored:
                self._restore(partition)
            last_record[partition] = now
            last_offset[partition] = message.offset
            last_message[partition] = message
            try:
                try:
                    event = decode(message.value)  # structured mode: what the engine reads
                except InvalidEvent:
                    if not message.headers:
                        raise
                    event = decode_dict(  # maybe CloudEvents binary mode
                        message.value,
                        _AsConfluent(message).headers(),
                        expected_type=EVENT_TYPE,
                        max_bytes=max_bytes,
                    )
            except InvalidEvent as e:
                self._deadletter(message, e.reason)
                continue
            # Event time is the CloudEvent `time`; an event without one (allowed by the
            # envelope) falls back to the record's timestamp.
            at = event.get("time")
            time_ms = round(at.timestamp() * 1000) if at is not None else _record_ms(message)
            apply(partition, message.offset, time_ms, event["data"])
            processed += 1
        self.processed += processed
        self.exporter.records.inc(len(messages) if isinstance(messages, Sequence) else 0)

    def highwater(self, partition: int) -> int | None:
        """The partition's high-water mark as the last fetch response gave it (None: not
        known); the faust app supplies it."""
        return None

    def caught_up(self, partition: int) -> bool:
        """Every record of the partition is processed. Without this, a partition starved by
        a busy neighbour (flow control, a slow machine) would look idle."""
        highwater = self.highwater(partition)
        return highwater is not None and self._last_offset.get(partition, -1) + 1 >= highwater

    async def tick(self) -> None:
        """Close the windows of partitions idle for `idle_ms` (see streams.windows): no
        record for that long, and read to the end."""
        idle_s = self.engine.config.idle_ms / 1000
        now = time.monotonic()
        due = [
            p
            for p in self._restored
            if now - self._last_record.get(p, now) >= idle_s and self.caught_up(p)
        ]
        if not due:
            return
        async with self.lock:
            wall_ms = round(time.time() * 1000)
            for partition in due:
                self.engine.idle(partition, wall_ms)
            await self.commit_effects()

    def revoked(self, partitions: Iterable[int]) -> None:
        self._revocations += 1
        for partition in partitions:
            self.engine.forget(partition)
            self._restored.discard(partition)
            self._last_record.pop(partition, None)
            self._last_offset.pop(partition, None)
            self._last_message.pop(partition, None)
            self._verified.discard(partition)

    # -- effects: publish, then persist ------------------------------------------------------

    async def commit_effects(self) -> None:
        engine = self.engine
        if engine.outbox:
            outbox, engine.outbox = engine.outbox, []
            for payload, eid, at in outbox:
                self.producer.publish(payload, event_id=eid, time=at)
            self._pending = True
        if self._pending:
            await asyncio.get_running_loop().run_in_executor(None, self.producer.flush)
            self._pending = False
        if engine.dirty_series or engine.dirty_partitions or self._last_message:
            self._persist()
            await self._flush_changelog()

    def _persist(self) -> None:
        engine, table = self.engine, self.table
        for key in engine.dirty_series:
            s = engine.series.get(key)
            if s is None:
                continue
            name, value = series_key(s.key), s.to_json()
            table.data[name] = value
            table.send_changelog(s.partition, name, value)
        # Anchors after the series: a crash between them leaves an older anchor of the same
        # log, still found at its offset.
        for partition, message in self._last_message.items():
            anchor = record_anchor(message)
            name, value = anchor_key(partition), {"o": anchor.offset, "d": anchor.digest}
            table.data[name] = value
            table.send_changelog(partition, name, value)
        self._last_message.clear()
        # Watermarks last: a crash before them only makes the restart re-derive stream time
        # from the redelivered records.
        for partition in engine.dirty_partitions:
            watermark = engine.watermarks.get(partition)
            if watermark is None:
                continue
            name = watermark_key(partition)
            table.data[name] = watermark
            table.send_changelog(partition, name, watermark)
        engine.dirty_series.clear()
        engine.dirty_partitions.clear()

    async def _flush_changelog(self) -> None:
        """Overridden by the faust app (its producer's flush); nothing to do in plain use."""

    def _restore(self, partition: int) -> None:
        series, watermark = [], None
        for key, value in list(self.table.data.items()):
            if key == watermark_key(partition):
                watermark = value
            elif key.startswith("s|") and value.get("p") == partition:
                series.append(value)
        self.engine.restore(partition, watermark, series)
        self._restored.add(partition)
        if series:
            log.info("streams: partition %d restored (%d series)", partition, len(series))

    def _deadletter(self, message: RawMessage, reason: str) -> None:
        record = _AsConfluent(message)
        for copy in (True, False):
            letter = dead_letter(
                record,
                reason=reason,
                error_type="InvalidEvent",
                consumer_group=self.group,
                consumer=NAME,
                copy=copy,
            )
            try:
                self.producer.publish(letter, key=record.key(), headers=dead_letter_headers(letter))
                break
            except DeliveryError:
                if not copy:
                    raise
        self._pending = True
        self.deadlettered += 1
        self.exporter.deadletters.inc()
        log.warning(
            "streams: dead-lettered %s/%s@%s: %s",
            message.topic,
            message.partition,
            message.offset,
            reason,
        )


def _record_ms(message: RawMessage) -> int:
    ts = message.timestamp
    return ts if ts is not None else round(time.time() * 1000)
