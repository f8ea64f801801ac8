"""The live projector (`mlbus lineage project`): a consumer group over the lineage topics
(see `projector.TOPICS`) that feeds the projection core batch by batch. The consumer, the
seek to the stored positions, the retries and the rebalances are the kernel's positioned
loop (mlbus/kafka/positioned.py); this module is its sink.

It resumes from the positions stored in SQL with the rows, never from Kafka's committed
offsets: those are committed too, after each SQL transaction, but only so that lag tools show
progress. Exactly-once effect: rows and positions commit together, rows are idempotent by
event id, so SIGKILL at any point followed by a restart gives the same store.

Each position is stored with the anchor of its log (mlbus/kafka/anchor.py), checked on
assignment. On a new log (`on_new_log`, setting `positions.on_new_log`): "fail" stops with
`NewLog`; "rebuild" rebuilds the whole store from the new log (rebuild.py, the same path as
`mlbus lineage rebuild`) and resumes from the rebuilt positions; "restart" keeps the rows,
drops that partition's position and projects the new log from its offset 0 (rows are keyed
by event id, so the old log's rows stay beside the new log's).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence

from mlbus.consumers.lineage.projector import DEFAULT_BATCH, TOPICS, Projector, ProjectStats
from mlbus.consumers.lineage.rebuild import rebuild as rebuild_store
from mlbus.consumers.lineage.store import LineageStore, discard, staging_for, swap_in
from mlbus.kafka.anchor import ON_NEW_LOG, Anchor, NewLog, Position
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.positioned import Batch, Partition, PositionedLoop
from mlbus.kafka.reader import LogRecord, read_log
from mlbus.services import service

DEFAULT_GROUP = service("lineage").group_id()  # its manifest: mlbus/services.py
#: Rebuilds in one run (`on_new_log="rebuild"`): a log that is new again right after a
#: rebuild is a broker that keeps losing its log, which a loop of rebuilds does not fix.
MAX_REBUILDS = 3

log = logging.getLogger("mlbus.consumers.lineage")


class LiveProjector:
    def __init__(
        self,
        kafka: KafkaConfig,
        store: LineageStore,
        *,
        group: str = DEFAULT_GROUP,
        topics: Iterable[str] = TOPICS,
        batch_size: int = DEFAULT_BATCH,
        poll_timeout: float = 0.5,
        on_new_log: str = "fail",
    ) -> None:
        if on_new_log not in ON_NEW_LOG:
            raise ValueError(f"on_new_log {on_new_log!r}: one of {', '.join(ON_NEW_LOG)}")
        self.on_new_log = on_new_log
        self.rebuilds = 0
        self.kafka = kafka
        self.store = store
        self.group = group
        self.topics = list(topics)
        self.batch_size = batch_size
        self.projector = Projector(store, topics=self.topics, max_event_bytes=kafka.max_event_bytes)
        self.stats = ProjectStats()
        # Each poll of up to `batch_size` records is one SQL transaction. Eager assignment:
        # nothing is buffered between polls, so a stop-the-world rebalance costs nothing
        # here, and the group is joined in one round instead of cooperative-sticky's two.
        self.loop = PositionedLoop(
            kafka,
            self,
            group=group,
            topics=self.topics,
            name="lineage projector",
            batch_size=batch_size,
            poll_timeout=poll_timeout,
            consumer_overrides={"partition.assignment.strategy": "range"},
            # a rebuild is of the whole store, done here between two runs of the loop
            on_new_log="restart" if on_new_log == "restart" else "fail",
        )
        #: set once every assigned partition has been read to its end at least once
        self.caught_up: threading.Event = self.loop.caught_up

    def stop(self) -> None:
        """Stop after the current batch (safe from signal handlers and other threads)."""
        self.loop.stop()

    def run(
        self, *, stop_at_end: bool = False, install_signal_handlers: bool = True
    ) -> ProjectStats:
        while True:
            try:
                self.loop.run(
                    stop_at_end=stop_at_end, install_signal_handlers=install_signal_handlers
                )
                return self.stats
            except NewLog as e:
                if self.on_new_log != "rebuild" or self.rebuilds >= MAX_REBUILDS:
                    raise
                log.warning("%s; rebuilding the store from the new log (on_new_log=rebuild)", e)
                self.rebuild()

    def rebuild(self) -> None:
        """The store rebuilt from the log as it is now (a staging store swapped in, as
        `mlbus lineage rebuild` does); the loop then resumes from the rebuilt positions."""
        self.rebuilds += 1
        staging = staging_for(self.store)
        try:
            stats = rebuild_store(staging, read_log(self.kafka, self.topics), self.batch_size)
        except BaseException:
            discard(staging)
            raise
        swap_in(staging, self.store)
        log.info("lineage store rebuilt from the new log: %d records", stats.records)

    # -- the positioned loop's sink --------------------------------------------------------

    def positions(self, partitions: Sequence[Partition]) -> Mapping[Partition, int | Position]:
        stored = self.store.anchored_positions()
        return {p: stored[p] for p in partitions if p in stored}

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        """One SQL transaction: the rows of `batch` and the positions after it (the
        projector derives the same positions from the records it is given)."""
        kafka = self.kafka
        records = [LogRecord.from_message(m, kafka) for ms in batch.values() for m in ms]
        self.stats.add(self.projector.project_batch(records))

    def release(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        pass  # nothing kept per partition: each batch is in SQL before the next poll

    def restart(self, partition: Partition, old: Anchor) -> None:
        """A new log in `partition` (`on_new_log="restart"`): its position goes; the rows
        stay (keyed by event id, the new log's rows join them)."""
        self.store.forget_position(*partition)
