"""The training worker: consumes `training.requested` (a long-running handler: the consumer
stays in its group while a run trains), publishes `training.started`, one
`training.progress` per epoch, and `training.completed` or `training.failed`.

Exactly-once effect: the run id is derived from the request's event id, the artifact is
written under it, and `training.completed` has an id derived from the run id; a finished
run leaves a marker, so a redelivered request re-announces the same completion (same event
id, which consumers drop as a duplicate) instead of training again. On shutdown the run is
abandoned uncommitted and another worker takes the request.
"""

from __future__ import annotations

import os
import resource
import socket
import time
import uuid

import torch

import mlbus
from mlbus import artifacts
from mlbus.errors import Abandon, MlbusError, TransientError
from mlbus.families import InvalidModelSpec, hyperparameters
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Record
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import read_events
from mlbus.storage import ObjectStore, StorageError
from mlbus.tables import DatasetReader, IntegrityError
from schemas.datasets import DatasetCreated
from schemas.envelope import Event
from schemas.training import (
    Artifact,
    CodeVersion,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)
from trainer.data import InvalidTrainingRequest, load_arrays, prepare
from trainer.training import fit

_NAMESPACE = uuid.UUID("0d6f3b8e-3c1e-4a7e-9a55-7f2d8c1b6e42")


def run_id_for(request_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, request_id))


class DatasetNotFound(MlbusError):
    """The requested dataset version is not in the log."""


#: Failures that a retry cannot fix: the run is reported failed, not retried.
_PERMANENT = (
    InvalidTrainingRequest, InvalidModelSpec, DatasetNotFound, IntegrityError, StorageError,
)  # fmt: skip


def find_dataset(kafka: KafkaConfig, name: str, version: str) -> DatasetCreated:
    """The `dataset.created` of name@version (a unique version prefix will do)."""
    found: dict[str, DatasetCreated] = {}
    for event in read_events(kafka, "dataset.created"):
        data: DatasetCreated = event.data  # type: ignore[assignment]
        if data.name == name and data.version.startswith(version):
            found[data.version] = data
    if len(found) != 1:
        problem = "no version" if not found else "an ambiguous version prefix"
        raise DatasetNotFound(f"dataset {name}@{version}: {problem} in the log")
    return next(iter(found.values()))


class TrainingWorker:
    """Handler for `training.requested`; run it in a ConsumerLoop with long_running=True."""

    def __init__(self, kafka: KafkaConfig, store: ObjectStore, producer: EventProducer) -> None:
        self.kafka = kafka
        self.store = store
        self.producer = producer
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, event: Event, record: Record) -> None:
        request: TrainingRequested = event.data  # type: ignore[assignment]
        run_id = run_id_for(event.id)
        marker = f"runs/{run_id}/completed.json"
        if self.store.exists(marker):  # finished before: announce the same completion again
            done = TrainingCompleted.model_validate_json(self.store.read_bytes(marker))
            self._complete(done, event, run_id)
            return
        self.producer.publish(
            TrainingStarted(run_id=run_id, model=request.model, request_id=event.id,
                            dataset=request.dataset, worker=self.worker),
            causation=event,
        )  # fmt: skip
        self.producer.flush()
        try:
            completed = self._train(request, event, run_id, record)
        except (TransientError, Abandon):
            raise  # retried / given back: not a failure of the run
        except _PERMANENT as e:
            self._fail(request, event, run_id, str(e), type(e).__name__, retryable=False)
            return
        self.store.write_bytes(marker, completed.model_dump_json().encode())
        self._complete(completed, event, run_id)

    def _train(
        self, request: TrainingRequested, event: Event, run_id: str, record: Record
    ) -> TrainingCompleted:
        started = time.perf_counter()
        params = hyperparameters(request.family, request.hyperparameters)
        data = find_dataset(self.kafka, request.dataset.name, request.dataset.version)
        if not data.label_column:
            raise InvalidTrainingRequest(f"dataset {data.name} declares no label column")
        features = [c.name for c in data.arrow_schema if c.name != data.label_column]
        with DatasetReader(self.store, data.uri, data.content_hash) as reader:
            x, labels = load_arrays(reader, num_rows=reader.num_rows, features=features,
                                    label=data.label_column)  # fmt: skip
        prepared = prepare(
            x, labels, features=features, label=data.label_column, seed=request.seed,
            validation=request.split.validation, test=request.split.test,
        )  # fmt: skip

        def progress(epoch: int, metrics: dict[str, float], rate: float) -> None:
            self.producer.publish(
                TrainingProgress(run_id=run_id, model=request.model, epoch=epoch,
                                 max_epochs=request.max_epochs, metrics=metrics,
                                 samples_per_second=rate),
                causation=event,
            )  # fmt: skip
            self.producer.poll(0)

        result = fit(prepared, request.family, params, max_epochs=request.max_epochs,
                     seed=request.seed, early_stopping=request.early_stopping,
                     on_epoch=progress, should_stop=lambda: record.stopping)  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak
        if record.stopping:
            raise Abandon(f"run {run_id} stopped at epoch {result.epochs}")
        card = {
            "family": request.family, "hyperparameters": params, "features": features,
            "feature_types": {c.name: c.type for c in data.arrow_schema},
            "label": data.label_column, "classes": prepared.classes,
            "mean": prepared.mean, "std": prepared.std, "metrics": result.metrics,
            "dataset": {"name": data.name, "version": data.version}, "run_id": run_id,
            "torch_version": torch.__version__,
        }  # fmt: skip
        saved = artifacts.save(self.store, f"models/{request.model}/{run_id}", result.model, card)
        return TrainingCompleted(
            run_id=run_id, model=request.model, version=run_id[:12], request_id=event.id,
            family=request.family,
            dataset=request.dataset.model_copy(update={"version": data.version}),
            artifact=Artifact(**saved), metrics=result.metrics,
            confusion_matrix=result.confusion_matrix, labels=prepared.classes,
            hyperparameters=params, seed=request.seed, epochs=result.epochs,
            code=CodeVersion(
                package_version=mlbus.__version__, git_commit=os.environ.get("MLBUS_GIT_COMMIT")
            ),
            torch_version=torch.__version__, device="cpu",
            duration_seconds=time.perf_counter() - started, peak_memory_bytes=peak,
        )  # fmt: skip

    def _complete(self, completed: TrainingCompleted, event: Event, run_id: str) -> None:
        self.producer.publish(
            completed, causation=event, event_id=str(uuid.uuid5(_NAMESPACE, f"{run_id}/completed"))
        )
        self.producer.flush()

    def _fail(self, request: TrainingRequested, event: Event, run_id: str, reason: str,
              error_type: str, *, retryable: bool) -> None:  # fmt: skip
        self.producer.publish(
            TrainingFailed(run_id=run_id, model=request.model, request_id=event.id, reason=reason,
                           retryable=retryable, error_type=error_type),
            causation=event, event_id=str(uuid.uuid5(_NAMESPACE, f"{run_id}/failed")),
        )  # fmt: skip
        self.producer.flush()
