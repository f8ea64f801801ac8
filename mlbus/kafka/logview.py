"""A log view: the state a component keeps from topics, read from the beginning and then kept
current. Every component that keeps state from the log uses one instead of a read loop of
its own: `LogView(kafka, ["dataset.created"], on_event=fold)`.

A view assigns every partition of its topics directly: it joins no consumer group and
commits nothing, so every replica sees every event and nobody's offsets move. It reads the
topics it is given and writes nothing. Records are decoded into typed events with their
position (`Positioned`); a record that does not decode is skipped with a warning (a group
consumer of that topic dead-letters it; a view must not, or each replica would).

- `catch_up()` reads every partition to its end *as it is now* and returns what it read.
  The first call starts at the beginning; a later one reads only what arrived since, so a
  lookup that needs the latest state ("is the version announced a moment ago there?")
  catches up first and then answers from the fold.
- `start()` follows in a background thread (catch up, then keep reading) until `stop()`;
  `wait()` blocks until the first catch-up is done. Or drive it yourself with `poll()`.
- `LogIndex` is the common fold: the first event of each key of one topic, caught up when
  a lookup does not find its key; `dataset_versions` is the one of `dataset.created`.

The fold (`on_event`) sees each record once, in log order within a partition, whichever
thread reads (calls are serialised); the position moves past a record before its fold runs,
so a fold that raises loses that record for this view. A view that is not followed hands its
partitions back between catch-ups, so an idle lookup view costs the broker nothing, and its
fetches wait only briefly (`LOOKUP_FETCH_WAIT_MS`): a fetch at the end of a partition is
answered when its wait is over, so a catch-up takes about one fetch wait. A followed view
waits the process's fetch wait (what its idle polling costs; `mlbus run` sets it per
service), and where `mlbus up` keeps a journal it stops fetching while idle until the journal
has a record for it (mlbus/kafka/quiet.py).

The end of a partition is found with `enable.partition.eof` (the fetch response's high-water
mark): right on Apache Kafka and on the embedded broker, whose list-offsets answer is wrong
(docs/broker.md). Each catch-up re-assigns the partitions at the view's positions, which
makes librdkafka report each partition's end again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from mlbus.errors import MlbusError, TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Consumed, next_batch
from mlbus.kafka.quiet import Quiet
from mlbus.kafka.reader import all_partitions
from mlbus.schemas.codec import decode
from mlbus.schemas.datasets import DatasetCreated
from mlbus.schemas.envelope import Event

log = logging.getLogger(__name__)

#: Records taken from the client per call (one fetch's worth on a busy topic).
BATCH = 500


@dataclass(frozen=True, slots=True)
class Positioned:
    """One event of a view and where it stands in the log (`topic` is the contract's name,
    without the deployment's prefix)."""

    event: Event
    topic: str
    partition: int
    offset: int

    @property
    def position(self) -> tuple[int, int]:
        """(partition, offset): the order of events within one partition."""
        return self.partition, self.offset


Fold = Callable[[Positioned], None]
K = TypeVar("K", bound=Hashable)
DatasetKey = tuple[str, str]  # (name, version) of a `dataset.created`


class LogView:
    """Typed events of `event_types`, caught up from the beginning and then followed."""

    def __init__(
        self,
        kafka: KafkaConfig,
        event_types: Sequence[str],
        *,
        on_event: Fold | None = None,
        name: str = "log view",
        poll_timeout: float = 0.1,
    ) -> None:
        self.kafka = kafka
        self.event_types = list(event_types)
        self.on_event = on_event
        self.name = name
        self.poll_timeout = poll_timeout
        #: Records skipped because they do not decode.
        self.skipped = 0
        #: The last error the following thread met (retried while it is an MlbusError).
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # one reader of the client at a time; folds run under it
        self._consumer: Consumer | None = None
        self._lookup_client = False  # the client was made for catch-ups only
        self._partitions: list[tuple[str, int]] = []
        self._assigned = False
        self._following = False
        self._positions: dict[tuple[str, int], int] = {}  # (topic, partition) → next offset
        self._caught_up = threading.Event()
        self._settled = threading.Event()  # caught up, or the following thread gave up
        self._stopping = threading.Event()
        self._failed = False
        self._thread: threading.Thread | None = None
        self._quiet = Quiet(kafka.journal)  # a followed view stops fetching while idle

    # -- state ------------------------------------------------------------------------------

    @property
    def caught_up(self) -> bool:
        """True once every partition has been read to its end at least once."""
        return self._caught_up.is_set()

    @property
    def positions(self) -> dict[tuple[str, int], int]:
        """(event type, partition) → the next offset this view will read."""
        with self._lock:
            items = list(self._positions.items())
        return {(self.kafka.event_type(t), p): offset for (t, p), offset in items}

    # -- reading ----------------------------------------------------------------------------

    def catch_up(self, timeout: float | None = None) -> list[Positioned]:
        """Read every partition to its end as it is now (records acknowledged before the call
        are included), fold them, and return them. `TransientError` if that takes longer
        than `timeout` seconds or the view is stopped meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            consumer = self._assign()
            remaining = set(self._partitions)
            items: list[Positioned] = []
            while remaining:
                if self._stopping.is_set():
                    raise TransientError(f"{self.name}: stopped before catching up")
                if deadline is not None and time.monotonic() > deadline:
                    raise TransientError(
                        f"{self.name}: not at the end of {', '.join(self.event_types)} "
                        f"within {timeout:.0f}s"
                    )
                for message in next_batch(consumer, BATCH, self.poll_timeout):
                    if self._take(message, items):
                        remaining.discard((message.topic(), message.partition()))
            if not self._following:  # a lookup view: nothing is fetched until the next call
                consumer.unassign()
                self._assigned = False
            self._caught_up.set()
            self._settled.set()
            return items

    def poll(self, timeout: float | None = None) -> list[Positioned]:
        """What arrived since the last read, waiting up to `timeout` (the view's poll timeout
        by default) for the first record; the first call catches up instead."""
        self._following = True
        if not self.caught_up:
            return self.catch_up()
        with self._lock:
            consumer = self._consumer if self._assigned else self._assign()
            assert consumer is not None
            items: list[Positioned] = []
            wait = self._quiet.poll_timeout(self.poll_timeout if timeout is None else timeout)
            batch = next_batch(consumer, BATCH, wait)
            for message in batch:
                self._take(message, items)
            self._quiet.step(consumer, bool(batch), lambda: self._partitions, self._unread)
            return items

    @property
    def quiet(self) -> bool:
        """True while the view follows without fetching (mlbus/kafka/quiet.py)."""
        return self._quiet.quiet

    def _unread(self) -> dict[tuple[str, int], int]:
        return {tp: self._positions.get(tp, 0) for tp in self._partitions}

    def _assign(self) -> Consumer:
        """The client, assigned every partition at this view's positions. Called with the
        lock held; re-assigning resets the fetch state, so each end is reported again."""
        if self._stopping.is_set():
            raise TransientError(f"{self.name}: stopped")
        lookup = not self._following
        if self._consumer is not None and self._lookup_client != lookup:
            # A lookup's client waits briefly per fetch; one that follows waits the process's
            # fetch wait, which is what its idle polling costs the broker.
            self._consumer.close()
            self._consumer = None
        if self._consumer is None:
            eof = {"enable.partition.eof": True}
            conf = self.kafka.lookup(**eof) if lookup else self.kafka.consumer(None, **eof)
            consumer = Consumer(conf)
            self._lookup_client = lookup
            try:
                topics = [self.kafka.topic(t) for t in self.event_types]
                found = all_partitions(consumer, self.kafka, topics)
            except BaseException:
                consumer.close()
                raise
            self._consumer = consumer
            self._partitions = [(tp.topic, tp.partition) for tp in found]
        self._quiet.resume(self._consumer)  # a catch-up of a quiet view: fetching again
        self._quiet.woken()
        self._consumer.assign(
            [
                TopicPartition(t, p, self._positions.get((t, p), OFFSET_BEGINNING))
                for t, p in self._partitions
            ]
        )
        self._assigned = True
        return self._consumer

    def _take(self, message: Consumed, items: list[Positioned]) -> bool:
        """Fold one record into the view; True if it says its partition is at its end."""
        key = (message.topic(), message.partition())
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return True
            if error.fatal():
                raise TransientError(f"{self.name}: reading {key[0]}: {error.str()}")
            return False  # librdkafka retries and logs the others itself
        offset = message.offset()
        if offset < self._positions.get(key, 0):
            return False  # read before the partitions were assigned again
        self._positions[key] = offset + 1
        event_type = self.kafka.event_type(key[0])
        try:
            event = decode(
                message.value(),
                message.headers(),
                expected_type=event_type,
                max_bytes=self.kafka.max_event_bytes,
            )
        except MlbusError as e:
            self.skipped += 1
            log.warning(
                "%s: skipping the invalid record %s[%d]@%d: %s",
                self.name,
                event_type,
                key[1],
                offset,
                e,
            )
            return False
        item = Positioned(event, event_type, key[1], offset)
        items.append(item)
        if self.on_event is not None:
            self.on_event(item)
        return False

    # -- following in a thread --------------------------------------------------------------

    def start(self) -> LogView:
        """Follow in a background thread: catch up, then fold each new record as it comes."""
        self._following = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the first catch-up of a started view: True once caught up, False after
        `timeout`; `TransientError` if the following thread gave up."""
        self._settled.wait(timeout)
        if self._failed:
            raise TransientError(f"{self.name}: {self.error}")
        return self.caught_up

    def _run(self) -> None:
        delay = 0.2
        while not self._stopping.is_set():
            try:
                while not self._stopping.is_set():
                    self.poll()
                    delay = 0.2
            except MlbusError as e:  # broker away, a topic not there yet: retried
                if self._stopping.is_set():
                    return
                self.error = e
                log.warning("%s: %s (retrying in %.1fs)", self.name, e, delay)
                self._reset()
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)
            except BaseException as e:  # a fold that fails is a bug: stop and say so
                self.error = e
                self._failed = True
                self._settled.set()
                log.exception("%s: stopped following", self.name)
                return

    def _reset(self) -> None:
        """Drop the client after an error; the next read starts a new one at the positions."""
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
                self._assigned = False
                self._quiet.woken()

    # -- lifecycle --------------------------------------------------------------------------

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following (joins the thread) and close the client; the view is done."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._reset()

    def __enter__(self) -> LogView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LogIndex(Generic[K]):
    """The first event of each key of one topic, kept by a log view that is caught up when
    asked for the state now; thread-safe. `close()` it (or use it as a context manager)."""

    def __init__(
        self, kafka: KafkaConfig, event_type: str, key: Callable[[Event], K], *, name: str = ""
    ) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._events: dict[K, Event] = {}
        self.view = LogView(kafka, [event_type], on_event=self._add, name=name or event_type)

    def _add(self, item: Positioned) -> None:
        key = self.key(item.event)
        with self._lock:
            self._events.setdefault(key, item.event)

    def get(self, key: K) -> Event | None:
        """The event of `key`; the view catches up first if it has not seen the key yet."""
        with self._lock:
            found = self._events.get(key)
        if found is None:
            self.view.catch_up()
            with self._lock:
                found = self._events.get(key)
        return found

    def events(self) -> list[Event]:
        """One event per key, in the order they were read, as the log has them now."""
        self.view.catch_up()
        with self._lock:
            return list(self._events.values())

    def close(self) -> None:
        self.view.stop()

    def __enter__(self) -> LogIndex[K]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dataset_versions(kafka: KafkaConfig, *, name: str = "dataset versions") -> LogIndex[DatasetKey]:
    """Every dataset version in the log, by (name, version): the index the registry, the
    trainer and the workflow look versions up in."""
    return LogIndex(kafka, "dataset.created", _dataset_key, name=name)


def _dataset_key(event: Event) -> DatasetKey:
    data: DatasetCreated = event.data
    return data.name, data.version
