"""Which dataset a training request trains on: only a version the validator checked. Reads
`dataset.validated` (what may be trained), `dataset.created` (what was announced: the schema
of older validations, and "announced but not validated yet") and the validator's dead letters
on `mlbus.deadletter` (why a version was refused). Writes nothing.

A version announced a moment before the request may not be validated yet: the lookup waits
for the validator's verdict until `wait_seconds` after the announcement's event time, so a
request for a version announced long ago and never validated fails at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC

from mlbus.errors import Abandon, MlbusError, UnknownDataset
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.deadletter import original_value
from mlbus.kafka.logview import DatasetKey, LogIndex, LogView, Positioned, dataset_versions
from mlbus.refs import resolve
from mlbus.schemas.catalog import DEADLETTER
from mlbus.schemas.codec import decode
from mlbus.schemas.datasets import ColumnSchema, DatasetCreated, DatasetValidated
from mlbus.schemas.deadletter import DeadLetter
from mlbus.schemas.envelope import Event
from mlbus.trainer.data import InvalidTrainingRequest


class DatasetNotValidated(InvalidTrainingRequest):
    """The version was refused by the validator, or not validated in time: never trained."""


@dataclass(frozen=True)
class Trainable:
    """A validated dataset version, with what training needs to read it."""

    name: str
    version: str
    uri: str
    content_hash: str
    label_column: str | None
    arrow_schema: list[ColumnSchema]


def _validated_key(event: Event) -> DatasetKey:
    data: DatasetValidated = event.data
    return data.name, data.version


class DatasetLookup:
    """Validated versions by (name, version), with the reason for those that are not.
    Thread-safe; `close()` it."""

    def __init__(
        self, kafka: KafkaConfig, *, wait_seconds: float = 120.0, poll_seconds: float = 0.5
    ) -> None:
        self.kafka = kafka
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self.validated: LogIndex[DatasetKey] = LogIndex(
            kafka, "dataset.validated", _validated_key, name="trainer validated datasets"
        )
        self.created = dataset_versions(kafka, name="trainer datasets")
        self._lock = threading.Lock()
        self._refusals: dict[DatasetKey, str] = {}
        self.refused = LogView(
            kafka, [DEADLETTER], on_event=self._refusal, name="trainer refused datasets"
        )

    def close(self) -> None:
        self.validated.close()
        self.created.close()
        self.refused.stop()

    def _refusal(self, item: Positioned) -> None:
        """Keep the reason of each dead-lettered `dataset.created` that decodes (a record
        that does not decode names no version)."""
        letter: DeadLetter = item.event.data
        if letter.original.topic != self.kafka.topic("dataset.created"):
            return
        raw = original_value(letter)
        if raw is None:
            return
        try:
            created = decode(raw, expected_type="dataset.created")
        except MlbusError:
            return
        data: DatasetCreated = created.data
        by = f" by {letter.consumer}" if letter.consumer else ""
        with self._lock:
            self._refusals[(data.name, data.version)] = f"refused{by}: {letter.reason}"

    def find(self, name: str, version: str, *, stopping: Callable[[], bool]) -> Trainable:
        """The validated version `name@version` (a unique prefix will do). `UnknownDataset`
        if it was never announced; `DatasetNotValidated` if the validator refused it or gave
        no verdict in time; `Abandon` if `stopping()` turns true while waiting."""
        validated = {e.data.version: e for e in self.validated.events() if e.data.name == name}
        created = {e.data.version: e for e in self.created.events() if e.data.name == name}
        full = resolve(
            name, version, set(validated) | set(created), kind="dataset", error=UnknownDataset
        )
        announced = created.get(full)
        deadline = self._deadline(announced)
        while full not in validated:
            self.refused.catch_up()
            with self._lock:
                refusal = self._refusals.get((name, full))
            if refusal is not None:
                raise DatasetNotValidated(
                    f"dataset {name}@{full} is not validated and is never trained: {refusal}"
                )
            if time.time() >= deadline:
                raise DatasetNotValidated(
                    f"dataset {name}@{full} was announced but not validated within "
                    f"{self.wait_seconds:g}s of its announcement; is the validator running "
                    "(mlbus run validator)? It is never trained unvalidated"
                )
            if stopping():
                raise Abandon(f"stopped while waiting for the validation of {name}@{full}")
            time.sleep(self.poll_seconds)
            found = self.validated.get((name, full))
            if found is not None:
                validated[full] = found
        data: DatasetValidated = validated[full].data
        schema = list(data.arrow_schema)
        if not schema:  # validated before dataset.validated carried the schema
            if announced is None:
                announced = self.created.get((name, full))
            schema = list(announced.data.arrow_schema) if announced is not None else []
        return Trainable(
            name=data.name,
            version=data.version,
            uri=data.uri,
            content_hash=data.content_hash,
            label_column=data.label_column,
            arrow_schema=schema,
        )

    def _deadline(self, announced: Event | None) -> float:
        """Until when to wait for a verdict: `wait_seconds` after the announcement, and never
        longer than that from now (a clock ahead of ours)."""
        now = time.time()
        if announced is None or announced.time is None:
            return now + self.wait_seconds
        at = announced.time
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return min(at.timestamp(), now) + self.wait_seconds
