"""The event producer: typed payloads in, CloudEvents on their topics out.

Idempotent with acks=all (kafka/config.py). Records are queued by `publish()` and confirmed
by `flush()`, which raises `DeliveryError` if the broker did not take every record — so a
command reports success only after the broker has the events. Only failed deliveries call
back into Python (`delivery.report.only.error`), which keeps the hot path in librdkafka —
except for a producer that waits for the embedded broker's journal (`DurableProducer`, the
CLI's): it notes where each record landed and `flush()` returns once the journal has them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from mlbus.errors import DeliveryError, TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import (
    STRUCTURED_HEADERS,
    Cause,
    EventRef,
    encode,
    encode_new,
    key_text,
)
from mlbus.schemas.envelope import Event

log = logging.getLogger(__name__)

RawHeaders = Sequence[tuple[str, bytes | None]]
#: A structured-mode record's headers, typed as confluent-kafka's `produce` takes headers.
_STRUCTURED: list[tuple[str, str | bytes | None]] = list(STRUCTURED_HEADERS)


@dataclass(frozen=True, slots=True)
class Undelivered:
    """A record the broker did not take (librdkafka gave up on it): kept for a retry."""

    topic: str
    value: bytes
    key: bytes | None
    headers: RawHeaders | None
    error: str


class _Outcomes:
    """Delivery outcomes. librdkafka's callbacks point here, not at the EventProducer, so
    that no reference cycle keeps a dropped producer (and its threads) alive."""

    __slots__ = ("delivered", "failed", "fatal")

    def __init__(self) -> None:
        self.failed: list[Undelivered] = []
        self.fatal: str | None = None
        self.delivered: dict[tuple[str, int], int] = {}
        """(topic, partition) → the last offset delivered there, when delivery is reported"""

    def on_delivery(self, error: KafkaError | None, message: Any) -> None:
        if error is not None:
            self.failed.append(
                Undelivered(
                    message.topic(), message.value(), message.key(), message.headers(), error.str()
                )
            )
        else:
            where = (message.topic(), message.partition())
            self.delivered[where] = max(message.offset(), self.delivered.get(where, -1))

    def on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self.fatal = error.str()
        log.warning("kafka producer: %s", error.str())


class EventProducer:
    """Publishes typed events. `source` names the producing service (CloudEvents `source`)."""

    #: `flush()` also waits until the embedded broker's journal has the records on disk (if
    #: one is kept): what a command acknowledges to its user survives a power cut.
    waits_for_journal = False

    def __init__(self, kafka: KafkaConfig, *, source: str, **overrides: Any) -> None:
        self.kafka = kafka
        self.source = source
        self.journal = kafka.journal if self.waits_for_journal else None
        conf = kafka.producer(**overrides)
        conf["delivery.report.only.error"] = self.journal is None
        self._outcomes = _Outcomes()
        conf["on_delivery"] = self._outcomes.on_delivery
        conf["error_cb"] = self._outcomes.on_error
        try:
            self._producer = Producer(conf)
        except KafkaException as e:
            raise TransientError(f"cannot create a Kafka producer: {e}") from None
        #: Records the broker did not take, as of the last `flush()`; see `retry_undelivered`.
        self.undelivered: list[Undelivered] = []

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        data: Payload,
        *,
        key: str | bytes | None = None,
        subject: str | None = None,
        causation: Cause | None = None,
        correlationid: str | None = None,
        event_id: str | None = None,
        time: datetime | None = None,
        headers: RawHeaders = (),
    ) -> EventRef:
        """Queue one event on its topic (the payload's type decides which); key defaults to
        the topic's key field, and is the event's `partitionkey`. `headers` go beside the
        structured-mode content type. Call `flush()` to confirm delivery."""
        envelope: dict[str, Any] = {}
        if key is not None:
            envelope["partitionkey"] = key_text(key)
        ref, value = encode_new(
            data,
            source=self.source,
            subject=subject,
            causation=causation,
            correlationid=correlationid,
            event_id=event_id,
            time=time,
            **envelope,
        )
        sent = [*STRUCTURED_HEADERS, *headers] if headers else None
        self.produce(self.kafka.topic(ref.type), value, key if key is not None else ref.key, sent)
        return ref

    def send(self, event: Event, *, key: str | bytes | None = None) -> None:
        """Queue an already-built event as it is (its id, source and time are kept)."""
        from mlbus.schemas.catalog import TOPICS

        if key is None:
            key = event.partitionkey or TOPICS[event.type].key_of(event.data)
        self.produce(self.kafka.topic(event.type), encode(event), key)

    def produce(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None,
        headers: RawHeaders | None = None,
    ) -> None:
        """Queue one raw record; waits for room when librdkafka's local queue is full."""
        if self._outcomes.fatal:
            raise DeliveryError(f"the producer is unusable: {self._outcomes.fatal}")
        sent: list[tuple[str, str | bytes | None]] = (
            _STRUCTURED if headers is None else list(headers)
        )
        while True:
            try:
                self._producer.produce(topic, value, key, headers=sent)
                return
            except BufferError:
                self._producer.poll(0.05)  # serve delivery reports to make room
            except KafkaException as e:
                raise DeliveryError(f"cannot produce to {topic}: {e.args[0].str()}") from None

    def try_produce(self, topic: str, value: bytes, key: str | bytes | None) -> bool:
        """Queue one raw record unless librdkafka's local queue is full: False then, and
        nothing queued. For a producer that drops rather than waits (the inference log)."""
        if self._outcomes.fatal:
            raise DeliveryError(f"the producer is unusable: {self._outcomes.fatal}")
        try:
            self._producer.produce(topic, value, key, headers=_STRUCTURED)
            return True
        except BufferError:
            return False
        except KafkaException as e:
            raise DeliveryError(f"cannot produce to {topic}: {e.args[0].str()}") from None

    def discard_failed(self) -> int:
        """Forget the records the broker did not take (librdkafka gave up on them) since
        the last call; returns how many. For a producer whose records may be lost, counted,
        but not kept: they would otherwise pile up until `flush()`."""
        failed, self._outcomes.failed = self._outcomes.failed, []
        return len(failed)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is confirmed; raise `DeliveryError` otherwise.

        Records librdkafka gave up on are kept in `undelivered` (it has dropped them), so a
        caller that must not lose them can `retry_undelivered()`."""
        remaining = self._producer.flush(timeout)
        failed, self._outcomes.failed = self._outcomes.failed, []
        self.undelivered.extend(failed)
        if self.undelivered:
            first = self.undelivered[0]
            more = f" (and {len(self.undelivered) - 1} more)" if len(self.undelivered) > 1 else ""
            raise DeliveryError(
                f"{len(self.undelivered)} record(s) not delivered: {first.topic}: "
                f"{first.error}{more}"
            )
        if remaining:
            raise DeliveryError(
                f"{remaining} record(s) not confirmed by the broker within {timeout:.0f}s "
                f"(is it reachable at {self.kafka.bootstrap}?)"
            )
        if self.journal is not None and self._outcomes.delivered:
            from mlbus.journal.format import wait_durable

            wait_durable(Path(self.journal), self._outcomes.delivered, timeout)
            self._outcomes.delivered = {}

    def retry_undelivered(self) -> int:
        """Queue again every record the broker did not take; returns how many."""
        records, self.undelivered = self.undelivered, []
        for record in records:
            self.produce(record.topic, record.value, record.key, record.headers)
        return len(records)

    def poll(self, timeout: float = 0.0) -> None:
        self._producer.poll(timeout)

    def in_flight(self) -> int:
        """Records queued or sent whose delivery report has not been served yet."""
        return len(self._producer)

    def close(self, timeout: float = 30.0) -> None:
        """Confirm what is queued, then release the connections."""
        try:
            self.flush(timeout)
        finally:
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not hide the original error behind a delivery error
            self._producer.flush(5.0)
            self._producer.close()


class DurableProducer(EventProducer):
    """An EventProducer whose `flush()` returns once the embedded broker's journal has the
    records on disk: for commands that tell a user their events are kept."""

    waits_for_journal = True
