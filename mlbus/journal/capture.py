"""Journal capture: a thread of `mlbus up` that reads every topic of the embedded broker
group-less, from where the journal ends, and appends each record to the journal as it is
written; every `snapshot_seconds` it records every consumer group's committed offsets.

Reads every topic of the broker (the contract topics and what services create, such as the
streams changelog); writes none. The loss bound this gives is in docs/broker.md: a record
reaches the file (and survives the death of every process) at most about half a fetch wait
after its producer's acknowledgement (the broker looks for new records halfway through a
wait), and the disk (a power cut) within `sync_seconds` more.

Idle, it stops fetching: a fetch that waits names every partition and costs the embedded
broker ~50 times a request that does not (docs/broker.md). Once a fetch wait brought nothing
and the consumer's position has reached every partition's end (the broker's "latest"
offset: past the last batch's base, so a position inside or past the last batch), the
capture pauses every partition and asks for the ends once every `watch_ms` instead (one
ListOffsets request); the first end that moves resumes the fetch at once. While idle a
record then reaches the file within `watch_ms` (plus a fetch and the sync).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource

from mlbus.journal.format import (
    DURABLE_FILE,
    GROUPS_FILE,
    TOPICS_FILE,
    VERSION,
    SegmentWriter,
    encode_batch,
    read_json,
    write_json,
)
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import next_batch

log = logging.getLogger(__name__)

Positions = dict[str, dict[int, int]]
"""topic → partition → next offset"""


class Capture:
    """Start with `start()`, stop with `stop()` (what was read is written and synced)."""

    def __init__(
        self,
        kafka: KafkaConfig,
        directory: Path,
        *,
        positions: Positions | None = None,
        sync_seconds: float = 0.2,
        snapshot_seconds: float = 1.0,
        fetch_wait_ms: int = 500,
        watch_ms: int = 400,
        nice: int = 10,
    ) -> None:
        self.kafka = kafka
        self.directory = directory
        self.positions: Positions = {t: dict(p) for t, p in (positions or {}).items()}
        self.sync_seconds = sync_seconds
        self.snapshot_seconds = snapshot_seconds
        self.fetch_wait_ms = fetch_wait_ms
        self.watch_ms = watch_ms
        self.nice = nice
        self.records = 0
        #: ListOffsets requests made while idle (each one look at every partition's end).
        self.watch_looks = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._topics: dict[str, Any] = read_json(directory / TOPICS_FILE).get("topics", {})
        self._groups: dict[str, dict[str, dict[str, int]]] = {}
        self._assigned: set[tuple[str, int]] = set()
        #: Idle: every partition paused, and the ends it had then (a move is a wake-up).
        self._resting: dict[tuple[str, int], int] | None = None
        #: Where each partition was last sought to: its position until a record comes.
        self._sought: dict[tuple[str, int], int] = {}
        self._lost = False
        """the broker died: stop without draining it (`abandon`)"""

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Returns once every partition is assigned (nothing written from now on is missed);
        the capture's error if it could not get there."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._writer = SegmentWriter(self.directory)
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="journal-capture", daemon=True
        )
        self._thread.start()
        ready.wait(timeout)
        if self.error is not None:
            raise self.error
        if not ready.is_set():
            raise TimeoutError(f"the journal capture did not start within {timeout:.0f}s")

    def _open(self) -> None:
        # The capture yields the CPU to the platform it copies: its thread, and librdkafka's
        # threads it starts (they inherit the value), run at a lower priority. On a busy
        # machine the journal then lags producers during a burst rather than slowing them.
        if self.nice:
            with contextlib.suppress(OSError, AttributeError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        conf = self.kafka.consumer(
            None,
            **{
                "isolation.level": "read_uncommitted",  # every record, as the broker has it
                "fetch.wait.max.ms": self.fetch_wait_ms,
                "queued.min.messages": 100000,
                # An end reached is reported: it moves the consumer's position past a
                # transaction's marker even when a fetch brings the marker alone (idle).
                "enable.partition.eof": True,
            },
        )
        self._consumer = Consumer(conf)
        self._admin = AdminClient(self.kafka.admin())
        self._discover()  # assigned before start() returns: nothing written is missed
        self._sync()  # durable.json names this process: publishers wait for it from now on

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def abandon(self, timeout: float = 10.0) -> None:
        """Stop after the broker died: what was read is written and synced, without waiting
        on the dead broker for more records or the groups' offsets."""
        self._lost = True
        self.stop(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """True while it watches the partitions' ends instead of fetching."""
        return self._resting is not None

    # -- the loop -------------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        opened = False
        try:
            self._open()
            opened = True
            ready.set()
            last_sync = last_discover = last_snapshot = last_record = time.monotonic()
            while not self._stop.is_set():
                if self._resting is not None:
                    self._stop.wait(self.watch_ms / 1000)
                    self._watch()
                else:
                    # As soon as a record is there: `consume(n, timeout)` would hold it until
                    # the timeout is over, adding up to a fetch wait to the loss bound.
                    messages = next_batch(self._consumer, 5000, self.fetch_wait_ms / 1000)
                    now = time.monotonic()
                    if self._write(messages):
                        last_record = now
                    elif self.watch_ms and now - last_record >= self.fetch_wait_ms / 1000:
                        self._rest()  # a fetch wait without records
                now = time.monotonic()
                if self._writer.dirty and now - last_sync >= self.sync_seconds:
                    self._sync()
                    last_sync = now
                if now - last_discover >= 1.0:
                    self._discover()
                    last_discover = now
                if now - last_snapshot >= self.snapshot_seconds:
                    self._snapshot_groups()
                    last_snapshot = now
            # Stopping: take what the broker still has (the services stopped first), then
            # make it durable with the groups' final offsets.
            if not self._lost:
                self._wake()
            while not self._lost and (rest := self._consumer.consume(5000, timeout=0.5)):
                self._write(rest)
            self._sync()
            if not self._lost:
                self._snapshot_groups()
        except BaseException as e:  # reported by the supervisor, which stops the platform
            self.error = e
            log.exception("journal capture failed")
        finally:
            ready.set()
            self._writer.close()
            if opened:
                self._consumer.close()

    # -- idle ---------------------------------------------------------------------------

    def _ends(self) -> dict[tuple[str, int], int] | None:
        """Every assigned partition's end as the broker reports it (one ListOffsets request
        for the latest offsets, read-uncommitted as the consumer is), or None if it did not
        answer."""
        if not self._assigned:
            return {}
        asked = [TopicPartition(t, p, OFFSET_END) for t, p in self._assigned]
        try:
            found = self._consumer.offsets_for_times(asked, timeout=2.0)
        except KafkaException as e:
            log.debug("journal: cannot list the partitions' ends: %s", e)
            return None
        if any(tp.error is not None for tp in found):
            return None
        return {(tp.topic, tp.partition): tp.offset for tp in found}

    def _rest(self) -> None:
        """After a fetch wait without records: pause every partition if the consumer has
        read into the last batch of each (a transaction's marker included: the consumer's
        position passes markers, the records' offsets do not)."""
        ends = self._ends()
        if ends is None:
            return
        tps = [TopicPartition(t, p) for t, p in ends]
        for tp in self._consumer.position(tps):
            if self._standing(tp) < ends[(tp.topic, tp.partition)]:
                return  # a record not read yet (or on its way)
        self._consumer.pause(tps)
        self._resting = ends

    def _standing(self, tp: TopicPartition) -> int:
        """Where the consumer stands in a partition: its position (`tp` as `position()`
        returned it) or, with none (nothing read since the partition was assigned or
        sought: the end it reached is reported once per offset, and a seek forgets it),
        where it was sought to or past its last record written, whichever is further."""
        if tp.offset >= 0:
            return int(tp.offset)
        return max(
            self.positions.get(tp.topic, {}).get(tp.partition, 0),
            self._sought.get((tp.topic, tp.partition), 0),
        )

    def _watch(self) -> None:
        """While idle: fetch again as soon as one partition's end moved."""
        ends = self._ends()
        self.watch_looks += 1
        resting = self._resting or {}
        if ends is None or any(resting.get(key) != end for key, end in ends.items()):
            self._wake()

    def _wake(self) -> None:
        """Fetch again, from where the consumer stands: each paused partition is sought
        there (a resumed partition is otherwise fetched again only after about 0.7 s,
        measured), then resumed."""
        if self._resting is None:
            return
        tps = [TopicPartition(t, p) for t, p in self._resting]
        self._resting = None
        for tp in self._consumer.position(tps) if tps else ():
            # An offset, not the logical "beginning", which would cost a lookup first (a
            # start past 0 is out of range, and "earliest" is where that resets to).
            tp.offset = self._standing(tp)
            with contextlib.suppress(KafkaException):
                self._consumer.seek(tp)
                self._sought[(tp.topic, tp.partition)] = tp.offset
        self._consumer.resume(tps)
        # librdkafka's broker thread notices a resume or a seek only when it next wakes up:
        # up to about a second later (measured). A request on its connection wakes it now.
        if tps:
            with contextlib.suppress(KafkaException):
                self._consumer.get_watermark_offsets(tps[0], timeout=2.0)

    def _write(self, messages: list[Any]) -> int:
        """Append the records among `messages` (not the ends reached); how many."""
        by_partition: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for m in messages:
            if m.error() is not None:
                continue  # an end reached, or a transient fetch error librdkafka retries
            by_partition[(m.topic(), m.partition())].append(m)
        frames = []
        written = 0
        for (topic, partition), batch in by_partition.items():
            frames.append(encode_batch(topic, partition, batch))
            self.positions.setdefault(topic, {})[partition] = batch[-1].offset() + 1
            written += len(batch)
        if frames:
            self._writer.write(b"".join(frames))
        self.records += written
        return written

    def _sync(self) -> None:
        self._writer.sync()
        # Read by publishers that wait for the journal (`wait_durable`); a signal, not data.
        write_json(
            self.directory / DURABLE_FILE,
            {
                "format": VERSION,
                "pid": os.getpid(),
                "positions": {
                    t: {str(p): o for p, o in ps.items()} for t, ps in self.positions.items()
                },
            },
            durable=False,
        )

    def _discover(self) -> None:
        """Assign every partition not yet read (new topics: from their beginning) and record
        each topic's partitions and configs, so a restore can create it first."""
        try:
            metadata = self._admin.list_topics(timeout=5.0)
        except (KafkaException, TimeoutError) as e:
            log.warning("journal: cannot list topics: %s", e)
            return
        new: list[TopicPartition] = []
        changed = False
        for name, topic in metadata.topics.items():
            if topic.error is not None or name.startswith("__"):
                continue
            known = self._topics.get(name)
            if known is None or known["partitions"] != len(topic.partitions):
                self._topics[name] = {
                    "partitions": len(topic.partitions),
                    "configs": self._configs(name),
                }
                changed = True
            for partition in topic.partitions:
                if (name, partition) in self._assigned:
                    continue
                start = self.positions.get(name, {}).get(partition, OFFSET_BEGINNING)
                new.append(TopicPartition(name, partition, start))
                self._assigned.add((name, partition))
        if changed:  # before any of the topic's records is written
            write_json(self.directory / TOPICS_FILE, {"format": VERSION, "topics": self._topics})
        if new:
            self._wake()  # a new partition is read from its start: fetch again, all of them
            self._consumer.incremental_assign(new)

    def _configs(self, topic: str) -> dict[str, str]:
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        try:
            entries = self._result(self._admin.describe_configs([resource])[resource])
        except (KafkaException, TimeoutError):
            return {}
        # The embedded broker answers with the configs the topic was created with (and flags
        # them all as defaults): kept as they are.
        return {k: v.value for k, v in entries.items() if v.value is not None}

    def _result(self, future: Future[Any], timeout: float = 5.0) -> Any:
        """An admin request's answer, waited for in short slices: when the broker dies the
        wait ends at once (`abandon`), instead of holding the broker's replacement for the
        rest of the request's timeout. TimeoutError when there is none."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(timeout=0.1)
            except TimeoutError:
                if self._lost or time.monotonic() >= deadline:
                    raise

    def _snapshot_groups(self) -> None:
        try:
            listed = self._result(self._admin.list_consumer_groups())
        except (KafkaException, TimeoutError) as e:
            log.warning("journal: cannot list consumer groups: %s", e)
            return
        groups: dict[str, dict[str, dict[str, int]]] = {}
        for listing in listed.valid:
            request = [ConsumerGroupTopicPartitions(listing.group_id)]
            try:
                future = self._admin.list_consumer_group_offsets(request)[listing.group_id]
                result = self._result(future)
            except (KafkaException, TimeoutError) as e:
                log.warning("journal: offsets of group %s: %s", listing.group_id, e)
                old = self._groups.get(listing.group_id)
                if old:
                    groups[listing.group_id] = old
                continue
            offsets: dict[str, dict[str, int]] = {}
            for tp in result.topic_partitions or []:
                if tp.offset >= 0:
                    offsets.setdefault(tp.topic, {})[str(tp.partition)] = tp.offset
            if offsets:
                groups[listing.group_id] = offsets
        if groups != self._groups:
            write_json(self.directory / GROUPS_FILE, {"format": VERSION, "groups": groups})
            self._groups = groups
