"""The trainer trains validated dataset versions only, and every failure it can know ends the
run with a non-retryable `training.failed` naming it, never a dead-lettered request: an
upstream dataset whose file lacks an announced column is refused by the validator (a dead
letter, no `dataset.validated`) and a direct request for it fails naming the column; a
version never validated fails; an error of no known kind (a string feature) fails too."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa
import pytest

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import TrainingRequested
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker, run_id_for
from tests.datasets.test_validator import parquet_bytes, publish_upstream, upstream_event
from tests.mlbus.kafka.support import dead_letters, read_events, run_to_end
from tests.trainer.test_worker import validate

pytestmark = pytest.mark.integration


@pytest.fixture
def lake(tmp_path: Path) -> tuple[ObjectStore, Path]:
    """The object store, allowed to read the upstream folder `lake` (as the settings do)."""
    store = ObjectStore((tmp_path / "store").as_uri())
    lake = tmp_path / "lake"
    lake.mkdir()
    store.allowed_roots = [str(lake)]
    return store, lake


def _train(kafka: KafkaConfig, group: str, store: ObjectStore, **options: float) -> None:
    with (
        EventProducer(kafka, source="mlbus/trainer") as producer,
        contextlib.closing(TrainingWorker(kafka, store, producer, **options)) as worker,
    ):
        loop = ConsumerLoop(
            kafka,
            group=group,
            name="trainer",
            long_running=True,
            handlers={"training.requested": worker},
        )
        stats = run_to_end(loop)
    assert stats.deadlettered == 0, "a request was dead-lettered"


def _request(kafka: KafkaConfig, model: str, name: str, version: str) -> str:
    with EventProducer(kafka, source="test") as producer:
        ref = producer.publish(
            TrainingRequested(
                model=model,
                family="mlp",
                max_epochs=2,
                dataset=DatasetRef(name=name, version=version),
            )
        )
    return ref.id


def test_a_missing_column_is_refused_by_the_validator_and_fails_a_direct_request(
    kafka: KafkaConfig, group: str, lake: tuple[ObjectStore, Path]
) -> None:
    store, folder = lake
    data = pa.table({"x": [float(i) for i in range(40)], "label": [i % 2 for i in range(40)]})
    raw = parquet_bytes(data)
    path = folder / "orders.parquet"
    path.write_bytes(raw)
    # The announcement claims a column `y` the file does not have.
    announced = [
        {"name": "x", "type": "double"},
        {"name": "y", "type": "double"},
        {"name": "label", "type": "int64"},
    ]
    event = upstream_event(path.as_uri(), raw, data, arrow_schema=announced)
    publish_upstream(kafka, event)

    validate(kafka, store)
    assert read_events(kafka, "dataset.validated") == []
    (letter,) = dead_letters(kafka)
    assert letter.data.original.topic == kafka.topic("dataset.created")
    assert "'y' announced but not in the file" in letter.data.reason

    request = _request(kafka, "orders", "lake-orders", "2026-11-21")
    _train(kafka, group, store)

    (failed,) = read_events(kafka, "training.failed")
    assert failed.data.request_id == request and failed.data.run_id == run_id_for(request)
    assert not failed.data.retryable
    assert failed.data.error_type == "DatasetNotValidated"
    assert "lake-orders@2026-11-21" in failed.data.reason
    assert "'y' announced but not in the file" in failed.data.reason
    assert read_events(kafka, "training.started") == []  # refused before any work
    assert read_events(kafka, "training.completed") == []


def test_a_version_never_validated_fails_at_once(
    kafka: KafkaConfig, group: str, lake: tuple[ObjectStore, Path]
) -> None:
    store, folder = lake
    data = pa.table({"x": [float(i) for i in range(40)], "label": [i % 2 for i in range(40)]})
    raw = parquet_bytes(data)
    path = folder / "orders.parquet"
    path.write_bytes(raw)
    # A good announcement, made long ago (its event time), that no validator ever checked:
    # the worker does not wait for a verdict that is overdue.
    publish_upstream(kafka, upstream_event(path.as_uri(), raw, data))
    request = _request(kafka, "orders", "lake-orders", "2026-11-21")

    _train(kafka, group, store, validation_wait_seconds=60.0)

    (failed,) = read_events(kafka, "training.failed")
    assert failed.data.request_id == request and not failed.data.retryable
    assert "lake-orders@2026-11-21 was announced but not validated" in failed.data.reason
    assert "mlbus run validator" in failed.data.reason

    # Validated now: the same kind of request trains.
    validate(kafka, store)
    again = _request(kafka, "orders", "lake-orders", "2026-11-21")
    _train(kafka, group, store)
    (completed,) = read_events(kafka, "training.completed")
    assert completed.data.request_id == again


def test_an_error_of_no_known_kind_fails_the_run_with_its_reason(
    kafka: KafkaConfig, group: str, lake: tuple[ObjectStore, Path]
) -> None:
    store, folder = lake
    # Valid Parquet, validated, but a string feature cannot become a float tensor.
    data = pa.table({"x": [f"v{i}" for i in range(40)], "label": [i % 2 for i in range(40)]})
    raw = parquet_bytes(data)
    path = folder / "orders.parquet"
    path.write_bytes(raw)
    publish_upstream(kafka, upstream_event(path.as_uri(), raw, data))
    validate(kafka, store)
    assert len(read_events(kafka, "dataset.validated")) == 1
    request = _request(kafka, "orders", "lake-orders", "2026-11-21")

    _train(kafka, group, store)

    (failed,) = read_events(kafka, "training.failed")
    assert failed.data.request_id == request and not failed.data.retryable
    assert failed.data.error_type == "ValueError"
    assert failed.data.reason.startswith("ValueError: ")
    assert dead_letters(kafka) == []
