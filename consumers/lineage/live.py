"""The live projector (`mlbus lineage project`): a consumer group over the lineage topics
(see `projector.TOPICS`) that feeds the projection core batch by batch. The consumer, the
seek to the stored positions, the retries and the rebalances are the kernel's positioned
loop (mlbus/kafka/positioned.py); this module is its sink.

It resumes from the positions stored in SQL with the rows, never from Kafka's committed
offsets: those are committed too, after each SQL transaction, but only so that lag tools show
progress. Exactly-once effect: rows and positions commit together, rows are idempotent by
event id, so SIGKILL at any point followed by a restart gives the same store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence

from mlbus.consumers.lineage.projector import DEFAULT_BATCH, TOPICS, Projector, ProjectStats
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.positioned import Batch, Partition, PositionedLoop
from mlbus.kafka.reader import LogRecord
from mlbus.services import service

DEFAULT_GROUP = service("lineage").group_id()  # its manifest: mlbus/services.py


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
    ) -> None:
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
        )
        #: set once every assigned partition has been read to its end at least once
        self.caught_up: threading.Event = self.loop.caught_up

    def stop(self) -> None:
        """Stop after the current batch (safe from signal handlers and other threads)."""
        self.loop.stop()

    def run(
        self, *, stop_at_end: bool = False, install_signal_handlers: bool = True
    ) -> ProjectStats:
        self.loop.run(stop_at_end=stop_at_end, install_signal_handlers=install_signal_handlers)
        return self.stats

    # -- the positioned loop's sink --------------------------------------------------------

    def positions(self, partitions: Sequence[Partition]) -> Mapping[Partition, int]:
        stored = self.store.positions()
        return {p: stored[p] for p in partitions if p in stored}

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        """One SQL transaction: the rows of `batch` and the positions after it (the
        projector derives the same positions from the records it is given)."""
        kafka = self.kafka
        records = [LogRecord.from_message(m, kafka) for ms in batch.values() for m in ms]
        self.stats.add(self.projector.project_batch(records))

    def release(self, partitions: Sequence[Partition], *, lost: bool) -> None:
        pass  # nothing kept per partition: each batch is in SQL before the next poll
