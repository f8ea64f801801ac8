"""Between faust and the window engine: decode each `inference.logged` record (bad ones to
`mlbus.deadletter`, as the kernel's ConsumerLoop does), apply it in partition order, then
publish the closed windows' `serving.metrics` / `serving.alert` and persist the changed
state to the faust table's changelog.

Guarantees: at-least-once with idempotent effects. Per batch, outputs are confirmed by the
broker first, then the state is written to the changelog, then the input offsets are
committed (streams/transport.py, after the batch). A restart re-reads from the committed offset:
records at or below a series' stored offset only move stream time (no double counting), and
outputs carry deterministic ids, so one that is published twice is one event to consumers.

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
from typing import Any, Protocol

from mlbus.errors import DeliveryError, InvalidEvent
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.deadletter import dead_letter, dead_letter_headers
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import decode_dict
from mlbus.streams.exporter import Exporter
from mlbus.streams.windows import Engine

log = logging.getLogger(__name__)

EVENT_TYPE = "inference.logged"
NAME = "streams"


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
    ) -> None:
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
        self._pending = False
        self.processed = 0
        self.deadlettered = 0

    # -- the agent's batches ---------------------------------------------------------------

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        async with self.lock:
            self.apply(messages)
            await self.commit_effects()

    def apply(self, messages: Iterable[RawMessage]) -> None:
        """Decode and apply records in order (synchronous: the hot path)."""
        apply = self.engine.apply
        now = time.monotonic()
        max_bytes = self.kafka.max_event_bytes
        last_record, last_offset = self._last_record, self._last_offset
        for message in messages:
            partition = message.partition
            if partition not in self._restored:
                self._restore(partition)
            last_record[partition] = now
            last_offset[partition] = message.offset
            try:
                try:
                    event = decode_dict(
                        message.value, expected_type=EVENT_TYPE, max_bytes=max_bytes
                    )
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
            self.processed += 1
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
        for partition in partitions:
            self.engine.forget(partition)
            self._restored.discard(partition)
            self._last_record.pop(partition, None)
            self._last_offset.pop(partition, None)

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
        if engine.dirty_series or engine.dirty_partitions:
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
