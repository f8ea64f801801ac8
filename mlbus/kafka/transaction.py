"""Finish a consumed record in one Kafka transaction: the events that conclude it are
published and the record's offset is committed together (`send_offsets_to_transaction`), so
a crash leaves either both or neither. Writes whatever events it is given; reads nothing.

What that guarantees depends on the broker (docs/broker.md):
- Apache Kafka (and Redpanda, MSK, Confluent): a consumer reading with
  `isolation.level=read_committed` (librdkafka's default) never sees the events of a
  transaction that aborted or never committed; a worker killed before the commit leaves no
  visible event, and the redelivered record publishes them once. Until the broker aborts a
  dead worker's open transaction (`transaction.timeout.ms`), read_committed readers of those
  partitions wait at it.
- The embedded broker (Tansu 0.6) runs transactions, but never ends the open transaction of
  a producer that died: read_committed readers of that partition then stop at it for good,
  later committed records included (measured; docs/broker.md). So mlbus does not use this on
  the embedded broker (`trainer.transactions` empty = off there): the outcome is published,
  then the offset committed, and a crash in between leaves a second copy with the same event
  id, which every consumer drops by id.

The offset commit is fenced by the group's generation (KIP-447): a worker that lost its
partition meanwhile cannot commit it, the transaction aborts, and the new owner redoes it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException, Producer

from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Record
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode
from mlbus.schemas.envelope import Event

log = logging.getLogger(__name__)

_HEADERS: list[tuple[str, str | bytes | None]] = list(STRUCTURED_HEADERS)


class Transactional:
    """A transactional producer that finishes records; one per consumer loop thread.

    Each instance has a transactional id of its own (`prefix` + a random suffix): fencing of
    a lost partition comes from the group metadata, not from reusing ids."""

    def __init__(self, kafka: KafkaConfig, *, prefix: str, timeout: float = 30.0) -> None:
        self.kafka = kafka
        self.timeout = timeout
        self.prefix = prefix
        self.transactional_id = ""
        self._producer: Producer | None = None

    def _ready(self) -> Producer:
        if self._producer is None:
            self.transactional_id = f"{self.prefix}-{uuid.uuid4().hex[:12]}"
            conf = self.kafka.producer(
                **{"transactional.id": self.transactional_id, "linger.ms": 0}
            )
            try:
                producer = Producer(conf)
                producer.init_transactions(self.timeout)
            except KafkaException as e:
                raise TransientError(f"cannot start a transactional producer: {_text(e)}") from None
            self._producer = producer
        return self._producer

    def finish(self, record: Record, events: Sequence[Event]) -> None:
        """Publish `events` and commit `record`'s offset in one transaction; `TransientError`
        if it did not commit (aborted: nothing of it counts, the caller may try again)."""
        producer = self._ready()
        try:
            producer.begin_transaction()
            for event in events:
                key = TOPICS[event.type].key_of(event.data)
                producer.produce(self.kafka.topic(event.type), encode(event), key, headers=_HEADERS)
            producer.send_offsets_to_transaction(
                [record.next_offset], record.group_metadata(), self.timeout
            )
            self._commit(producer)
        except KafkaException as e:
            self._abort(producer, e)
            raise TransientError(
                f"transaction finishing {record.topic}[{record.partition}]@{record.offset} "
                f"did not commit: {_text(e)}"
            ) from None

    def _commit(self, producer: Producer) -> None:
        """The commit point (its own method: the crash tests stop a worker right before)."""
        producer.commit_transaction(self.timeout)

    def _abort(self, producer: Producer, error: KafkaException) -> None:
        kafka_error: KafkaError = error.args[0]
        if kafka_error.fatal():  # fenced or broken: a new producer (new id) next time
            log.warning("transactional producer unusable (%s); replacing it", kafka_error.str())
            self.close()
            return
        try:
            producer.abort_transaction(self.timeout)
        except KafkaException as e:
            log.warning("abort failed (%s); replacing the transactional producer", _text(e))
            self.close()

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.flush(5.0)
            producer.close()


def _text(error: KafkaException) -> str:
    first = error.args[0] if error.args else error
    return first.str() if isinstance(first, KafkaError) else str(first)
