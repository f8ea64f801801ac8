"""The live projector (`mlbus lineage project`): a consumer group over the lineage topics
(see `projector.TOPICS`) that feeds the projection core batch by batch.

It resumes from the positions stored in SQL with the rows (seek in on_assign), never from
Kafka's committed offsets: those are committed too, after each SQL transaction, but only so
that lag tools show progress. Exactly-once effect: rows and positions commit together, rows
are idempotent by event id, so SIGKILL at any point followed by a restart gives the same
store. Uses confluent_kafka.Consumer directly because the kernel's ConsumerLoop resumes from
Kafka's committed offsets and hands over one decoded event at a time (see the report).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from mlbus.consumers.lineage.projector import DEFAULT_BATCH, TOPICS, Projector, ProjectStats
from mlbus.consumers.lineage.store import LineageStore
from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import next_batch
from mlbus.kafka.reader import LogRecord
from mlbus.services import service
from mlbus.signals import install_stop_handlers

log = logging.getLogger("mlbus.consumers.lineage")

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
        self.poll_timeout = poll_timeout
        self.projector = Projector(store, topics=self.topics,
                                   max_event_bytes=kafka.max_event_bytes)  # fmt: skip
        self.stats = ProjectStats()
        self._stop = threading.Event()
        self._consumer: Consumer | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._at_end: set[tuple[str, int]] = set()
        #: set once every assigned partition has been read to its end at least once
        self.caught_up = threading.Event()

    def stop(self) -> None:
        """Stop after the current batch (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(
        self, *, stop_at_end: bool = False, install_signal_handlers: bool = True
    ) -> ProjectStats:
        conf = self.kafka.consumer(
            self.group,
            # eager assignment: on_assign gets the whole assignment and sets every offset
            **{"partition.assignment.strategy": "range", "enable.partition.eof": True},
        )
        consumer = self._consumer = Consumer(conf)
        consumer.subscribe([self.kafka.topic(t) for t in self.topics],
                           on_assign=self._on_assign, on_revoke=self._on_revoke)  # fmt: skip
        restore = install_stop_handlers(self._on_signal) if install_signal_handlers else None
        try:
            while not self._stop.is_set():
                messages = next_batch(consumer, self.batch_size, self.poll_timeout)
                records = []
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            self._at_end.add((message.topic(), message.partition()))
                        elif error.fatal():
                            raise TransientError(f"lineage projector: {error.str()}")
                        else:
                            log.warning("lineage projector: %s", error.str())
                        continue
                    self._at_end.discard((message.topic(), message.partition()))
                    records.append(LogRecord.from_message(message, self.kafka))
                if records:
                    self.stats.add(self.projector.project_batch(records))
                    self._commit_kafka(records)
                if self._assigned and self._at_end >= self._assigned:
                    if not self.caught_up.is_set():
                        log.info("lineage projector caught up: %d records", self.stats.records)
                    self.caught_up.set()
                    if stop_at_end:
                        break
        finally:
            if restore:
                restore()
            try:
                consumer.close()
            except KafkaException as e:  # leaving the group failed: the positions are in SQL
                log.warning("lineage projector: closing the consumer: %s", e)
            self._consumer = None
        return self.stats

    # -- rebalancing: positions come from SQL -----------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        positions = self.store.positions()
        for tp in partitions:
            tp.offset = positions.get(
                (self.kafka.event_type(tp.topic), tp.partition), OFFSET_BEGINNING
            )
        self._assigned = {(tp.topic, tp.partition) for tp in partitions}
        self._at_end.clear()
        log.info("lineage projector assigned %d partitions (resuming from SQL positions)",
                 len(partitions))  # fmt: skip
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing to flush: each batch is committed to SQL before the next poll.
        self._assigned = set()
        self._at_end.clear()
        consumer.unassign()

    def _commit_kafka(self, records: list[LogRecord]) -> None:
        """Informational only (lag tools): the projector resumes from SQL."""
        ends: dict[tuple[str, int], int] = {}
        for r in records:
            ends[(r.topic, r.partition)] = r.offset + 1
        offsets = [TopicPartition(self.kafka.topic(t), p, o) for (t, p), o in ends.items()]
        try:
            assert self._consumer is not None
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException:
            pass  # e.g. revoked meanwhile; harmless, SQL holds the truth

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("lineage projector: %s, stopping after the current batch", signum.name)
        self.stop()
