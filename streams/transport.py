"""faust's aiokafka transport with a cheaper hand-off from the fetcher to the app: what lets
`mlbus streams` keep up with a hand-written aiokafka loop (bench/streams.py).

Why: faust's fetch loop (`Consumer._drain_messages`, faust-streaming 0.15) delivers each
record with `await self.wait_first(callback(message), self.suspend_flow.wait())`, and
`mode`'s `wait_first` creates four tasks per call (the callback, the suspend event, the
service's stopped and crashed events), waits on them with `asyncio.wait` and cancels three;
then the record becomes a faust `Message` and `Event`, goes through the conductor, the
stream's queue and its iterator: far more per record than fetching it, which caps an app at
a few thousand records/s whatever the agent does (docs/streams.md, bench/streams.py).

What changes, in the fetch loop only:

- Topics listed in `app.batch_handlers` (the app's input) are handed over a whole fetch at a
  time: one handler call with every partition's records (aiokafka `ConsumerRecord`s, in
  offset order), then one commit of the offsets after it. The handler's contract is the
  at-least-once one faust's agents have: effects durable when it returns, idempotent when
  repeated. A rebalance that begins or happens during the call makes the loop drop the
  rest of the fetch and leave the read positions to the new assignment's seek to the
  committed offsets, so the owner re-reads what was not committed.
- Every other record (table changelogs during recovery, other agents' topics) takes
  faust's per-record path, with the callback run inline until it finishes or has to wait
  (a full stream buffer, flow control); only then is the rest of it raced against
  `suspend_flow` as faust does, so a rebalance still interrupts a blocked delivery.

And in the fetcher (aiokafka's, in faust's consumer thread): aiokafka keeps one fetch in
flight per broker and leaves out of it the partitions whose fetched records are not handed
out yet. While the app works through a large fetch, the next fetch therefore names only the
partitions that had nothing (at their end, or without records at all), and waits
`fetch_max_wait_ms` for them: 1.5 s in faust, whole on the embedded broker, which answers a
waiting fetch only when its wait is over (docs/broker.md), and on Kafka too when those
partitions get nothing. Every partition with records to read then stays unfetched until
that wait ends, although the app is done with its records long before: in a catching-up
run the app waited so for about half of its wall time (docs/streams.md, "Fetching"). So:

- a fetch sent while fetched records are still waiting to be handed out waits at most
  `BUSY_FETCH_WAIT_MS`; with nothing waiting, the configured wait stands (what idle polling
  costs the broker is unchanged);
- records waiting to be handed out hold back a fetch of their broker's other partitions for
  up to `PREFETCH_BACKOFF_S` (aiokafka: 0.1 s): the app takes a fetch whole, so the next
  fetch, of every partition, goes out as soon as it has, and is answered while the app
  works; in between the consumer's thread does not wake (each wake-up takes the GIL).

Group membership, assignment, table recovery and standby logic, the producer, timers and
the web server stay faust's. This subclasses faust internals and is tied to the
faust-streaming version range in pyproject.toml; tests/streams cover delivery, a restart
with table recovery, and a takeover of partitions by a second worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, cast

import faust
from aiokafka.consumer.fetcher import Fetcher as AIOKafkaFetcher
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, TransportT
from mode import Service, ServiceT

from mlbus.streams.clients import ConsumerThread, Producer

#: How long a fetch waits (ms) when sent while records fetched before are still waiting to be
#: handed out to the app: the embedded profile's wait (mlbus/kafka/config.py), what the
#: kernel's consumers wait there.
BUSY_FETCH_WAIT_MS = 10
#: How long (s) records fetched and not yet handed out keep aiokafka from fetching the other
#: partitions of their broker (aiokafka: 0.1 s).
PREFETCH_BACKOFF_S = 0.5


class _Fetcher(AIOKafkaFetcher):
    """aiokafka's fetcher whose fetches wait at most BUSY_FETCH_WAIT_MS while fetched records
    are waiting to be handed out (module docstring)."""

    _fetch_max_wait_ms: int
    _records: dict[Any, Any]

    def _get_actions_per_node(self, assignment: Any) -> Any:  # pragma: no cover - aiokafka's
        if not self._records:
            return super()._get_actions_per_node(assignment)
        wait = self._fetch_max_wait_ms
        self._fetch_max_wait_ms = min(wait, BUSY_FETCH_WAIT_MS)
        try:
            return super()._get_actions_per_node(assignment)
        finally:
            self._fetch_max_wait_ms = wait


class _ConsumerThread(ConsumerThread):
    """faust's thread of the aiokafka consumer: a client that follows a replaced broker and a
    stop that finishes (streams/clients.py), with the fetcher above."""

    async def on_start(self) -> None:  # pragma: no cover - faust's
        await super().on_start()
        fetcher = getattr(self._consumer, "_fetcher", None)
        # The fetcher is made by aiokafka's start(); its loop only sends fetches once a
        # partition is assigned, so it takes the subclass's rule from the first fetch.
        if fetcher is not None and type(fetcher) is AIOKafkaFetcher:
            fetcher.__class__ = _Fetcher
            fetcher._prefetch_backoff = PREFETCH_BACKOFF_S


class _Rest:
    """The remainder of a coroutine that was stepped once by hand and suspended on
    `first`: awaiting this resumes it where it stopped, so it can run in its own task."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:
                try:
                    value = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


#: An async callable taking the records one fetch returned for a topic (aiokafka
#: `ConsumerRecord`s, per partition in offset order); when it returns, their effects are
#: durable, and the offsets are committed.
BatchHandler = Callable[[dict[TP, list[Any]]], Awaitable[None]]


class Consumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer; its fetch loop hands the records of the topics in
    `app.batch_handlers` over a whole fetch at a time, and every other record (table
    changelogs during recovery, other agents' topics) one at a time as faust does; its
    fetcher does not hold back partitions with records behind a long fetch wait."""

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover - faust's
        handlers: dict[str, BatchHandler] = getattr(self.app, "batch_handlers", {})
        consumer_should_stop = cast(Service, self)._stopped.is_set
        fetcher_should_stop = cast(Service, fetcher)._stopped.is_set
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records, active = await self._wait_next_records(1.0)
                # faust sleeps here too: getmany may return at once, time after time.
                await self.sleep(0)
                if records and not self.should_stop:
                    generation = self.app.consumer_generation_id
                    batches: dict[TP, list[Any]] = {}
                    others: dict[TP, list[Any]] = {}
                    for tp, batch in records.items():
                        if active is None or tp in active or tp in self._buffered_partitions:
                            (batches if tp.topic in handlers else others)[tp] = batch
                    if batches:
                        await self._deliver_batches(handlers, batches, generation)
                    if others:
                        await self._deliver_each(others, generation)
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    def _current(self, generation: int) -> bool:
        """Still delivering: flow not stopped by a rebalance, same group generation."""
        return self.flow_active and self.app.consumer_generation_id == generation

    async def _deliver_batches(
        self, handlers: dict[str, BatchHandler], batches: dict[TP, list[Any]], generation: int
    ) -> None:
        """One handler call per topic for everything one fetch returned (so one flush of
        outputs and changelog, one commit), then the commit of the offsets after it."""
        read_offset = self._read_offset
        by_topic: dict[str, dict[TP, list[Any]]] = {}
        for tp, batch in batches.items():
            last_read = read_offset.get(tp)
            if last_read is not None and batch[0].offset < last_read:
                batch = [r for r in batch if r.offset >= last_read]
            if batch:
                by_topic.setdefault(tp.topic, {})[tp] = batch
        for topic, parts in by_topic.items():
            if not self._current(generation):
                return  # a rebalance began: what was fetched is fetched again by the owner
            await handlers[topic](parts)
            if not self._current(generation):
                # A rebalance happened meanwhile: the new assignment's seek to the committed
                # offsets decides what is read next (the handler's effects are idempotent).
                return
            offsets = {tp: batch[-1].offset + 1 for tp, batch in parts.items()}
            read_offset.update(offsets)
            try:
                await self._commit(offsets)
            except Exception as e:
                # Revoked meanwhile, or the broker is away: the records are delivered again
                # (to whoever owns the partition) and change nothing twice.
                self.log.warning("commit of %s failed (%r): they are redelivered", offsets, e)

    async def _deliver_each(self, records: dict[TP, list[Any]], generation: int) -> None:
        """faust's per-record path (its `getmany` + `_drain_messages` body), with the
        cheaper hand-off described in the module docstring."""
        callback = self.callback
        to_message = self._to_message
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        commit_every = self._commit_every
        suspend_flow = self.suspend_flow
        since_yield = 0
        for tp, record in self.scheduler.iterate(records):
            if not self._current(generation):
                return
            self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
            message = to_message(tp, record)
            since_yield += 1
            if since_yield > 100:
                await asyncio.sleep(0)
                since_yield = 0
            offset = message.offset
            r_offset = get_read_offset(tp)
            if r_offset is not None and offset < r_offset:
                continue
            gap = offset - (r_offset or 0)
            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                await self._add_gap(tp, r_offset + 1, offset)
            if commit_every is not None and self._n_acked >= commit_every:
                self._n_acked = 0
                await self.commit()
            # The change: step the delivery inline; race it against a flow suspension
            # only if it has to wait (faust: always, four tasks per record).
            coro: Coroutine[Any, Any, Any] = callback(message)  # type: ignore[assignment]  # faust's callback is a coroutine function; its type says Awaitable
            try:
                first = coro.send(None)
            except StopIteration:
                pass
            else:
                await self.wait_first(_Rest(coro, first), suspend_flow.wait())
            set_read_offset(tp, offset)


class Transport(faust_aiokafka.Transport):
    Consumer = Consumer
    Producer = Producer


class App(faust.App):
    """faust.App on this transport (for the consumer; producing is faust's own).
    `batch_handlers` maps a topic to the handler of its fetched batches."""

    batch_handlers: dict[str, BatchHandler]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_handlers = {}

    def _new_transport(self) -> TransportT:
        return Transport(self.conf.broker_consumer, self)
