"""The consumer loop every mlbus service runs: decode and validate each record, dispatch it
to the handler of its event type, commit only what was handled, dead-letter what cannot be.

Guarantees (docs/architecture.md, "Processing guarantees"):
- at-least-once: an offset is committed only after its handler returned (commits are
  batched by count and time, and made synchronously on revocation and shutdown); handlers
  make their effects idempotent by event id, so a redelivery changes nothing;
- an undecodable or invalid record, or one whose handler raises `InvalidEvent` or an
  unexpected error, goes to `mlbus.deadletter` (delivery confirmed before its offset is
  committed) and the loop moves on;
- a `TransientError` from a handler is retried with exponential backoff, with the
  assignment paused so the consumer stays in its group; nothing is skipped;
- SIGTERM/SIGINT finish the current record, commit, and leave the group.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from mlbus.errors import Abandon, DeliveryError, InvalidEvent, TransientError
from mlbus.kafka import observed
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.deadletter import dead_letter, dead_letter_headers
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.quiet import Quiet
from mlbus.schemas.base import Payload
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import decode
from mlbus.schemas.envelope import Event
from mlbus.signals import install_stop_handlers

log = logging.getLogger(__name__)

_EOF = KafkaError._PARTITION_EOF


class Consumed(Protocol):
    """A `Message` as a consumer receives it. confluent-kafka's stubs type `Message` for
    every use, including a producer's not yet delivered (no partition or offset) and
    headers given as a dict; a consumed record, or a partition's end-of-partition event,
    always has its topic, partition and offset, and its headers are (name, bytes) pairs."""

    def topic(self) -> str: ...
    def partition(self) -> int: ...
    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes | None]] | None: ...
    def error(self) -> KafkaError | None: ...
    def timestamp(self) -> tuple[int, int]: ...


def next_batch(consumer: Consumer, size: int, timeout: float) -> list[Consumed]:
    """Up to `size` records, returning as soon as one is there: `consume(size, timeout)`
    alone waits out the whole timeout unless `size` records are ready, which adds up to
    `timeout` of latency per record on a quiet topic."""
    first = consumer.poll(timeout)
    if first is None:
        return []
    batch = [first, *consumer.consume(size - 1, 0)] if size > 1 else [first]
    return cast("list[Consumed]", batch)


class Record:
    """Where an event came from: a read-only view of the Kafka record (no copies)."""

    __slots__ = ("_group", "_message", "_stopping")

    def __init__(
        self,
        message: Consumed,
        stopping: threading.Event | None = None,
        group: Callable[[], object] | None = None,
    ) -> None:
        self._message = message
        self._stopping = stopping
        self._group = group

    def group_metadata(self) -> object:
        """The consumer group's metadata (generation, member) as of now, for committing this
        record's offset in a producer's transaction (`mlbus.kafka.transaction`); None for a
        record read outside a consumer loop."""
        return self._group() if self._group is not None else None

    @property
    def next_offset(self) -> TopicPartition:
        """The position to commit once this record is done."""
        return TopicPartition(self.topic, self.partition, self.offset + 1)

    @property
    def stopping(self) -> bool:
        """True once the loop has been asked to stop: a long-running handler checks this,
        saves what it can and raises `Abandon`."""
        return self._stopping is not None and self._stopping.is_set()

    @property
    def topic(self) -> str:
        return self._message.topic()

    @property
    def partition(self) -> int:
        return self._message.partition()

    @property
    def offset(self) -> int:
        return self._message.offset()

    @property
    def key(self) -> bytes | None:
        return self._message.key()

    @property
    def timestamp_ms(self) -> int | None:
        kind, ts = self._message.timestamp()
        return ts if kind else None

    @property
    def headers(self) -> list[tuple[str, bytes | None]]:
        return self._message.headers() or []

    @property
    def value(self) -> bytes | None:
        return self._message.value()


P = TypeVar("P", bound=Payload)
#: What handles the events of one type, typed by their payload: a `Handler[DatasetCreated]`
#: is `def on_created(event: Event[DatasetCreated], record: Record) -> None`. The loop's
#: mapping holds handlers of several types (`Handler[Any]`); each gets events of its type.
Handler = Callable[[Event[P], Record], None]


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        return min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))


@dataclass
class LoopStats:
    handled: int = 0
    deadlettered: int = 0
    retries: int = 0
    commits: int = 0


class ConsumerLoop:
    """Consume the topics of `handlers` (event type → handler) in consumer group `group`.

    `on_handler_error` decides what an unexpected exception from a handler does: dead-letter
    the record and go on (default), or stop the loop and re-raise.

    `long_running` handlers (training a model, say) run in a worker thread while the loop
    keeps polling with its assignment paused, so the consumer stays in its group however
    long a record takes; such a handler watches `record.stopping` and raises `Abandon` to
    give its record back on shutdown.
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        group: str,
        handlers: Mapping[str, Handler[Any]],
        name: str = "mlbus",
        batch_size: int = 1000,
        commit_every: int = 10_000,
        commit_interval: float = 1.0,
        backoff: Backoff = Backoff(),
        on_handler_error: Literal["deadletter", "raise"] = "deadletter",
        consumer_overrides: Mapping[str, Any] | None = None,
        long_running: bool = False,
    ) -> None:
        unknown = [t for t in handlers if t not in TOPICS]
        if unknown:
            raise ValueError(f"no such event type(s) in the contract: {', '.join(unknown)}")
        self.kafka = kafka
        self.group = group
        self.name = name
        self.batch_size = batch_size
        self.commit_every = commit_every
        self.commit_interval = commit_interval
        self.backoff = backoff
        self.on_handler_error = on_handler_error
        self.long_running = long_running
        self.stats = LoopStats()
        observed.watch(self)  # its counts on /metrics
        self._handlers = dict(handlers)
        self._types = {kafka.topic(t): t for t in handlers}  # topic → the type it carries
        self._overrides = dict(consumer_overrides or {})
        self._consumer: Consumer | None = None
        self._deadletters: EventProducer | None = None
        self._pending: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset
        self._quiet = Quiet(kafka.journal)  # no fetching while idle (mlbus/kafka/quiet.py)
        self._uncommitted = 0
        self._last_commit = time.monotonic()
        self._assigned: set[tuple[str, int]] = set()
        self._at_end: set[tuple[str, int]] = set()
        self._backlog: list[Consumed] = []
        self._stopping = threading.Event()

    # -- control ---------------------------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """True while it polls without fetching, idle (mlbus/kafka/quiet.py)."""
        return self._quiet.quiet

    def stop(self) -> None:
        """Ask the loop to stop after the current record (safe from signals and threads)."""
        self._stopping.set()

    def run(
        self,
        *,
        stop_at_end: bool = False,
        max_events: int | None = None,
        install_signal_handlers: bool = True,
    ) -> LoopStats:
        """Run until stopped (signal or `stop()`), until every assigned partition is read to
        its end (`stop_at_end`), or until `max_events` were handled."""
        conf = self.kafka.consumer(self.group, **self._overrides)
        conf["on_commit"] = self._on_commit
        if stop_at_end:
            conf["enable.partition.eof"] = True
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            list(self._types),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        restore = install_stop_handlers(self._on_signal) if install_signal_handlers else None
        try:
            self._loop(stop_at_end, max_events)
            self._commit(asynchronous=False)
        finally:
            if restore:
                restore()
            self._close()
        return self.stats

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, stop_at_end: bool, max_events: int | None) -> None:
        consumer = self._consumer
        assert consumer is not None
        pending = self._pending
        types = self._types
        limit = max_events if max_events is not None else -1
        while not self._stopping.is_set():
            if self._backlog:
                batch, self._backlog = self._backlog, []
            else:
                batch = next_batch(consumer, self.batch_size, self._quiet.poll_timeout(0.5))
            for message in batch:
                if self._stopping.is_set():
                    break
                error = message.error()
                if error is not None:
                    self._on_message_error(message, error)
                    continue
                topic = message.topic()
                tp = (topic, message.partition())
                if tp not in self._assigned:
                    continue  # revoked while this batch was in hand: the new owner reads it
                if stop_at_end:
                    self._at_end.discard(tp)  # records after an end-of-partition: not at end
                if not self._process(message, topic, types[topic], tp):
                    continue  # abandoned (stopping or revoked during retries): not done
                if tp not in self._assigned:
                    continue  # revoked while a long handler ran: the new owner redelivers it
                pending[tp] = message.offset() + 1
                self._uncommitted += 1
                if self.stats.handled == limit:
                    self._stopping.set()
            if self._uncommitted >= self.commit_every or (
                self._uncommitted and time.monotonic() - self._last_commit >= self.commit_interval
            ):
                self._commit(asynchronous=True)
            if stop_at_end and self._assigned and self._at_end >= self._assigned:
                return
            if not stop_at_end:
                self._quiet.step(consumer, bool(batch), lambda: list(self._assigned), self._next)

    def _process(self, message: Consumed, topic: str, event_type: str, tp: tuple[str, int]) -> bool:
        """Handle one record; True when it is done (handled or dead-lettered)."""
        value = message.value()
        try:
            try:
                event = decode(
                    value, expected_type=event_type, max_bytes=self.kafka.max_event_bytes
                )
            except InvalidEvent:
                headers = message.headers()
                if not headers:
                    raise
                event = decode(  # maybe CloudEvents binary mode
                    value, headers, expected_type=event_type, max_bytes=self.kafka.max_event_bytes
                )
        except InvalidEvent as e:
            self._deadletter(message, e.reason, "InvalidEvent")
            return True
        handler = self._handlers[event_type]
        attempt = 0
        while True:
            try:
                self._call(handler, event, Record(message, self._stopping, self._group()))
                self.stats.handled += 1
                return True
            except Abandon:
                log.info(
                    "%s: %s@%s/%s given back unfinished", self.name, topic, tp[1], message.offset()
                )
                self._stopping.set()
                return False
            except TransientError as e:
                attempt += 1
                self.stats.retries += 1
                delay = self.backoff.delay(attempt)
                log.warning(
                    "%s: %s@%s/%s failed (attempt %d, retrying in %.1fs): %s",
                    self.name,
                    topic,
                    tp[1],
                    message.offset(),
                    attempt,
                    delay,
                    e,
                )
                if not self._wait_in_group(delay) or tp not in self._assigned:
                    return False
            except InvalidEvent as e:
                self._deadletter(message, e.reason, "InvalidEvent")
                return True
            except Exception as e:
                if self.on_handler_error == "raise":
                    raise
                log.exception("%s: handler for %s failed; dead-lettering", self.name, event_type)
                self._deadletter(message, f"handler failed: {e!r}", type(e).__name__)
                return True

    def _call(self, handler: Handler[Any], event: Event, record: Record) -> None:
        if not self.long_running:
            handler(event, record)
            return
        raised: list[BaseException] = []

        def work() -> None:
            try:
                handler(event, record)
            except BaseException as e:  # re-raised on the loop's thread
                raised.append(e)

        worker = threading.Thread(target=work, name=f"{self.name}-handler", daemon=True)
        worker.start()
        self._wait_in_group(math.inf, until=lambda: not worker.is_alive(), interruptible=False)
        worker.join()
        if raised:
            raise raised[0]

    def _wait_in_group(
        self,
        seconds: float,
        *,
        until: Callable[[], bool] | None = None,
        interruptible: bool = True,
    ) -> bool:
        """Wait (for a retry, or for a long-running handler: `until`) while staying in the
        group: the assignment is paused, so polling serves heartbeats, rebalances and the
        poll interval but returns no records. False when interrupted by a stop."""
        consumer = self._consumer
        assert consumer is not None
        paused = [TopicPartition(t, p) for t, p in self._assigned]
        consumer.pause(paused)
        try:
            deadline = time.monotonic() + seconds
            while not (interruptible and self._stopping.is_set()):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (until is not None and until()):
                    return True
                message = consumer.poll(min(remaining, 0.1))
                if message is not None:  # fetched before the pause took effect
                    self._backlog.append(cast(Consumed, message))
            return False
        finally:
            still = [tp for tp in paused if (tp.topic, tp.partition) in self._assigned]
            if still:
                consumer.resume(still)

    def _group(self) -> Callable[[], object]:
        """How a handler gets the group's metadata. A long-running handler's thread gets it
        as of the dispatch: librdkafka's call blocks while this thread polls. A membership
        that changed since then fences the handler's transaction, which is what it should."""
        consumer = self._consumer
        assert consumer is not None
        if not self.long_running:
            return consumer.consumer_group_metadata
        metadata = consumer.consumer_group_metadata()
        return lambda: metadata

    def _deadletter(self, message: Consumed, reason: str, error_type: str) -> None:
        if self._deadletters is None:
            self._deadletters = EventProducer(self.kafka, source=f"mlbus/{self.name}")
        for copy in (True, False):
            letter = dead_letter(
                message,
                reason=reason,
                error_type=error_type,
                consumer_group=self.group,
                consumer=self.name,
                copy=copy,
            )
            try:
                self._deadletters.publish(
                    letter, key=message.key(), headers=dead_letter_headers(letter)
                )
                break
            except DeliveryError as e:  # e.g. too large for the producer: keep the metadata
                if not copy:
                    raise
                log.warning(
                    "%s: dead letter refused with its copy (%s); sending without", self.name, e
                )
        self.stats.deadlettered += 1
        log.warning(
            "%s: dead-lettered %s/%s@%s: %s",
            self.name,
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
        )

    def _on_message_error(self, message: Consumed, error: KafkaError) -> None:
        if error.code() == _EOF:
            self._at_end.add((message.topic(), message.partition()))
            return
        if error.fatal():
            raise KafkaException(error)
        log.warning("%s: consumer: %s", self.name, error.str())

    # -- commits and rebalances -------------------------------------------------------------

    def _commit(self, *, asynchronous: bool, only: Iterable[tuple[str, int]] | None = None) -> None:
        keys = list(self._pending) if only is None else [k for k in only if k in self._pending]
        if not keys or self._consumer is None:
            return
        # Inside a rebalance callback there is no waiting: what is not confirmed now is
        # handed over uncommitted, and the new owner reads those records again.
        if self._deadletters is not None and not self._confirm_deadletters(patient=only is None):
            return  # not confirmed: these records are redelivered next time
        offsets = [TopicPartition(t, p, self._pending.pop((t, p))) for t, p in keys]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)  # type: ignore[call-overload]  # the stubs overload on a literal flag only
            self.stats.commits += 1
        except KafkaException as e:
            # Not fatal: these records are redelivered and handlers are idempotent.
            log.warning("%s: commit failed (records will be redelivered): %s", self.name, e)
        if only is None:
            self._uncommitted = 0
            self._last_commit = time.monotonic()

    def _confirm_deadletters(self, *, patient: bool) -> bool:
        """Wait until every dead letter is confirmed, re-sending those the broker did not
        take: a dead-lettered record's offset is committed only after its letter is safe.
        False if that did not happen (not `patient`, or the loop is asked to stop)."""
        assert self._deadletters is not None
        attempt = 0
        while True:
            try:
                self._deadletters.flush(timeout=10.0)
                return True
            except TransientError as e:
                attempt += 1
                log.warning("%s: dead letters not confirmed (%s)", self.name, e)
                self._deadletters.retry_undelivered()
                if not patient or self._stopping.is_set():
                    return False
                if not self._wait_in_group(self.backoff.delay(attempt)):
                    return False

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if error is not None:
            log.warning("%s: asynchronous commit failed: %s", self.name, error.str())

    def _next(self) -> dict[tuple[str, int], int] | None:
        """The next offset this member reads of each assigned partition: after the last
        record handed out, else the group's committed offset (the start if none); None if
        the group's offsets cannot be read now."""
        consumer = self._consumer
        assert consumer is not None
        assigned = [TopicPartition(t, p) for t, p in self._assigned]
        try:
            found = {(tp.topic, tp.partition): tp.offset for tp in consumer.position(assigned)}
            unknown = [TopicPartition(t, p) for (t, p), o in found.items() if o < 0]
            if unknown:
                for tp in consumer.committed(unknown, timeout=5):
                    found[(tp.topic, tp.partition)] = max(tp.offset, 0)
        except KafkaException:
            return None
        return found

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._quiet.resume(consumer)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.add(key)
            self._at_end.discard(key)
        log.debug("%s: assigned %s", self.name, [(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._quiet.resume(consumer)  # the partitions it keeps fetch again
        keys = [(tp.topic, tp.partition) for tp in partitions]
        self._commit(asynchronous=False, only=keys)  # hand over what is done
        self._forget(keys)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._quiet.resume(consumer)
        keys = [(tp.topic, tp.partition) for tp in partitions]
        for key in keys:  # another member owns them already: committing would be wrong
            self._pending.pop(key, None)
        self._forget(keys)

    def _forget(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self._assigned.discard(key)
            self._at_end.discard(key)

    def _close(self) -> None:
        if self._deadletters is not None:
            try:
                self._deadletters.close()
            except TransientError as e:
                log.error("%s: dead letters not confirmed at shutdown: %s", self.name, e)
            self._deadletters = None
        if self._consumer is not None:
            self._consumer.close()  # leaves the group
            self._consumer = None

    def _on_signal(self, signum: signal.Signals) -> None:
        if self._stopping.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        log.info("%s: %s received, stopping", self.name, signum.name)
        self.stop()
