"""Restore (`mlbus archive restore`): re-publish archived records into a (new) cluster, so a
lost cluster can be rebuilt from the archive. Reads the archive; writes the restored topics
(under the target deployment's topic prefix).

Records go out as they were: value bytes unchanged (hence the same event ids), same key
(hence, through the partitioner, each entity's events in one partition, in their archived
order), same headers and CreateTime, through the idempotent producer (acks=all) so a retry
inside librdkafka neither duplicates nor reorders.

Safe to re-run: a topic that already holds records is refused unless `force` (restoring
old events behind newer ones would break per-key order); with `force`, records whose
identity — the event id, or for a record that is not an event a hash of key and value — is
already on the topic are skipped, so a restore interrupted half-way is finished by running
it again, and running it twice publishes nothing the second time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from mlbus.consumers.archive.layout import identity
from mlbus.consumers.archive.reader import read_archive
from mlbus.errors import Conflict, DeliveryError, TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import LogRecord, read_log
from mlbus.schemas.catalog import topic as contract_topic
from mlbus.storage import ObjectStore

log = logging.getLogger("mlbus.consumers.archive")


class TargetNotEmpty(Conflict):
    """A restore target topic already holds records (and `force` was not given)."""


@dataclass
class RestoreReport:
    topic: str
    archived: int = 0  # records read from the archive
    published: int = 0  # records produced (and confirmed) to the target
    skipped: int = 0  # records already on the target topic (force mode)
    present: int = 0  # records the target topic held before the restore


def record_identity(record: LogRecord) -> str:
    """What makes a record the same record on another cluster: its event id, else a hash of
    its key and value (a record that is not an event has no id to go by)."""
    event_id, _ = identity(record.value, record.headers)
    if event_id is not None:
        return event_id
    digest = hashlib.sha256()
    for part in (record.key, record.value):
        digest.update(b"-" if part is None else b"+%d:" % len(part))
        digest.update(part or b"")
    return "sha256:" + digest.hexdigest()


def restore(
    kafka: KafkaConfig,
    store: ObjectStore,
    topics: Sequence[str],
    *,
    force: bool = False,
    timeout: float = 60.0,
) -> list[RestoreReport]:
    """Re-publish the archive's records of `topics` (contract names) into `kafka`'s
    topics, which must exist (`mlbus topics apply`). Returns one report per topic; raises
    `TargetNotEmpty` before publishing anything if a target holds records and not `force`,
    `DeliveryError` if the broker did not confirm every record (re-run with `force`)."""
    names = [contract_topic(t).name for t in topics]
    reports = {name: RestoreReport(name) for name in names}
    present: dict[str, set[str]] = {}
    for name in names:  # read_log raises UnknownTopic for a topic that is not there
        present[name] = {record_identity(r) for r in read_log(kafka, [name])}
        reports[name].present = len(present[name])
    crowded = [f"{n} ({len(ids)} records)" for n, ids in present.items() if ids]
    if crowded and not force:
        raise TargetNotEmpty(
            f"target topic(s) not empty: {', '.join(crowded)}; restoring behind newer events "
            f"breaks their order — use --force to publish only what they lack"
        )
    failures: list[str] = []

    def on_delivery(error: KafkaError | None, message: object) -> None:
        if error is not None:
            failures.append(error.str())

    try:
        producer = Producer(kafka.producer(on_delivery=on_delivery))
    except KafkaException as e:
        raise TransientError(f"cannot create a Kafka producer: {e}") from None
    for record in read_archive(store, names):
        report = reports[record.topic]
        report.archived += 1
        if present[record.topic] and record_identity(record) in present[record.topic]:
            report.skipped += 1
            continue
        _produce(producer, kafka.topic(record.topic), record)
        report.published += 1
    remaining = producer.flush(timeout)
    if failures or remaining:
        first = failures[0] if failures else "not confirmed in time"
        raise DeliveryError(
            f"restore: {len(failures) + remaining} record(s) not delivered ({first}); "
            f"run the restore again with --force to publish the rest"
        )
    for report in reports.values():
        log.info(
            "restore %s: %d archived, %d published, %d already there",
            report.topic,
            report.archived,
            report.published,
            report.skipped,
        )
    return list(reports.values())


def _produce(producer: Producer, topic: str, record: LogRecord) -> None:
    kwargs: dict[str, Any] = {"headers": list(record.headers)}
    if record.timestamp_ms is not None:
        kwargs["timestamp"] = record.timestamp_ms
    while True:
        try:
            producer.produce(topic, record.value, record.key, **kwargs)
            producer.poll(0)
            return
        except BufferError:
            producer.poll(0.05)  # librdkafka's queue is full: let deliveries make room
        except KafkaException as e:
            raise DeliveryError(f"cannot produce to {topic}: {e.args[0].str()}") from None
