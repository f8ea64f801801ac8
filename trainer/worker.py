"""The training worker: consumes `training.requested` (a long-running handler: the consumer
stays in its group while a run trains), publishes `training.started`, one
`training.progress` per epoch, and `training.completed` or `training.failed`. It trains only
validated dataset versions (lookup.py reads `dataset.validated`).

Every failure that can be known (a dataset not validated, a missing column, an unknown
family, bad hyperparameters, an unreadable file, a bug) ends the run with one non-retryable
`training.failed` naming it; only a `TransientError` (object store or broker away) is
retried, announced by retryable notices. Records that do not decode are dead-lettered by the
loop before they get here.

Exactly-once effect: the run id is derived from the request's event id, the artifact and
the epoch checkpoints are written under it, and `training.completed` has an id derived from
the run id; a finished run leaves a marker, so a redelivered request re-announces the same
completion (same event id, which consumers drop as a duplicate) instead of training again.
The outcome and the request's offset are committed in one Kafka transaction when
transactions are on (mlbus/kafka/transaction.py: on Apache Kafka a crash between the two
leaves one completion on the log). Without transactions (the embedded broker) a worker first
reads the outcomes already on the log and does not publish one whose id is there: a crash
between publishing and committing leaves one completion on the log too.
A redelivered unfinished run (worker killed, shut down, transient failure) resumes from its
last epoch checkpoint (`training.started` with `attempt` > 1 and `resumed_from_epoch`) and
ends with the metrics an uninterrupted run would have had. On shutdown the run checkpoints
at the epoch boundary and is abandoned uncommitted; another worker takes the request.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import time
import uuid
from typing import Any, cast

import torch

import mlbus
from mlbus import artifacts
from mlbus.errors import Abandon, MlbusError, TransientError
from mlbus.families import FamilyUnavailable, hyperparameters, resolve, task_of
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Record
from mlbus.kafka.logview import LogView
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.transaction import Transactional
from mlbus.ml.card import ModelCard
from mlbus.ml.tensors import tensor_shape
from mlbus.schemas.codec import wrap
from mlbus.schemas.envelope import Event
from mlbus.schemas.training import (
    PRUNED,
    Artifact,
    CodeVersion,
    Task,
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
    run_id_for,
)
from mlbus.storage import ObjectStore
from mlbus.tables import DatasetReader
from mlbus.trainer import checkpoint
from mlbus.trainer.data import InvalidTrainingRequest, load_arrays, prepare
from mlbus.trainer.distributed import fit_distributed
from mlbus.trainer.lookup import DatasetLookup, Trainable
from mlbus.trainer.pruning import Pruned, PruneWatch
from mlbus.trainer.rendezvous import Host, Timeouts
from mlbus.trainer.training import Checkpoint, fit, inference_latency, use_threads

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("0d6f3b8e-3c1e-4a7e-9a55-7f2d8c1b6e42")


class DeviceUnavailable(InvalidTrainingRequest):
    """The request names a device this worker does not have (CUDA on a CPU-only machine)."""


#: A failure's reason is cut to this many characters (an error may echo whole inputs).
MAX_REASON = 2000


def reason_of(error: BaseException) -> str:
    """What a `training.failed` says about an error: its message for mlbus's own errors,
    prefixed with its type for any other (a `KeyError` says little more than a name)."""
    text = str(error).strip()
    if not isinstance(error, MlbusError) or not text:
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def resolve_device(requested: str | None) -> str:
    """The torch device for a request: cpu, cuda, cuda:N; None = cuda if present, else cpu.
    Determinism (same request, same metrics) is promised on the CPU."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    name = requested.strip().lower()
    if name == "cpu":
        return "cpu"
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InvalidTrainingRequest(f"unknown device {requested!r}: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {requested!r} requested but CUDA is not available on this worker "
            f"({socket.gethostname()}, torch {torch.__version__})"
        )
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"device {requested!r} requested but this worker has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return name


class TrainingWorker:
    """Handler for `training.requested`; run it in a ConsumerLoop with long_running=True.

    Exactly-once: effects are idempotent by the request's event id (run id, artifact and
    checkpoint keys, and the ids of `training.completed`/`training.failed` derive from it).
    """

    def __init__(
        self,
        kafka: KafkaConfig,
        store: ObjectStore,
        producer: EventProducer,
        *,
        validation_wait_seconds: float = 120.0,
        transactions: Transactional | None = None,
        rendezvous: Timeouts | None = None,
        advertise: str = "127.0.0.1",
        torch_threads: int = 0,
    ) -> None:
        self.kafka = kafka
        self.store = store
        self.producer = producer
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.torch_threads = torch_threads  # per run; 0 = torch's default
        self._retries: dict[str, int] = {}  # run id → transient failures seen by this process
        self.datasets = DatasetLookup(kafka, wait_seconds=validation_wait_seconds)
        #: Finishes a request (its outcome and its offset) in one transaction; None: the
        #: outcome is published, and the loop commits the offset later.
        self.transactions = transactions
        #: The final outcomes on the log (read incrementally before each one is published
        #: without a transaction) and the ids seen so far.
        self._outcomes = LogView(
            kafka, ["training.completed", "training.failed"], name="published run outcomes"
        )
        self._published: set[str] = set()
        self._prunes = PruneWatch(kafka)
        #: A `workers: N` run: how long to wait for members, and the address they dial.
        self.rendezvous, self.advertise = rendezvous or Timeouts(), advertise
        self._host: Host | None = None

    def close(self) -> None:
        """Stop the log views of the datasets and the transactional producer (the worker's
        owner calls this)."""
        self.datasets.close()
        self._outcomes.stop()
        self._prunes.close()
        if self.transactions is not None:
            self.transactions.close()

    def __call__(self, event: Event[TrainingRequested], record: Record) -> None:
        request: TrainingRequested = event.data
        run_id = run_id_for(event.id)
        try:
            self._handle(request, event, run_id, record)
        except Abandon:
            raise  # given back unfinished: not a failure of the run
        except Pruned as e:  # its search stopped it: a final outcome that says so
            failed = self._failure(
                request, event, run_id, str(e), PRUNED, pruned=True, epoch=e.epoch
            )
            self._finish(failed, record)
        except TransientError as e:
            # The loop retries the request with backoff (staying in its group); say so on
            # the bus, with an id per retry so the notices are not taken for duplicates.
            retry = self._retries[run_id] = self._retries.get(run_id, 0) + 1
            self._notice(request, event, run_id, f"{e}; retrying", type(e).__name__, retry)
            raise
        except Exception as e:
            # Anything else is known now and a retry would meet it again: the run fails with
            # its reason, and the request is handled (never dead-lettered, so whoever waits
            # for its outcome gets one).
            if not isinstance(e, MlbusError):
                log.exception("trainer: run %s failed", run_id)
            failed = self._failure(request, event, run_id, reason_of(e), type(e).__name__)
            self._finish(failed, record)
        self._retries.pop(run_id, None)

    def _handle(
        self, request: TrainingRequested, event: Event, run_id: str, record: Record
    ) -> None:
        marker = f"runs/{run_id}/completed.json"
        if self.store.exists(marker):  # finished before: announce the same completion again
            done = TrainingCompleted.model_validate_json(self.store.read_bytes(marker))
            self._finish(self._completion(done, event, run_id), record)
            return
        # Only a validated version, as the log has them now (it may have been announced a
        # moment ago: the lookup waits a while for the validator's verdict). Before
        # `training.started`: a refused request never starts.
        data = self.datasets.find(
            request.dataset.name, request.dataset.version, stopping=lambda: record.stopping
        )
        attempt = self._next_attempt(run_id)
        identity = {
            "request_id": event.id,
            "family": request.family,
            "hyperparameters": request.hyperparameters,
            "seed": request.seed,
            "dataset": request.dataset.model_dump(mode="json"),
        }
        resume = checkpoint.load(self.store, run_id, identity)
        # Data parallel: this worker is rank 0 and announces its store (docs/distributed.md).
        self._host = Host(self.advertise, self.rendezvous) if request.workers > 1 else None
        try:
            self.producer.publish(
                TrainingStarted(
                    run_id=run_id,
                    model=request.model,
                    request_id=event.id,
                    dataset=request.dataset,
                    worker=self.worker,
                    attempt=attempt,
                    resumed_from_epoch=resume.epoch if resume else None,
                    rendezvous=self._host.address if self._host else None,
                ),
                causation=event,
            )
            self.producer.flush()
            completed = self._train(request, event, run_id, record, data, resume, identity)
        finally:
            if self._host is not None:
                self._host.close()
        self.store.write_bytes(marker, completed.model_dump_json().encode())
        self._finish(self._completion(completed, event, run_id), record)

    def _next_attempt(self, run_id: str) -> int:
        """1 for the first delivery of a request, +1 for each redelivery that got this far
        (kept on the store: the previous attempt may have run in another process)."""
        key = f"runs/{run_id}/attempt.json"
        previous = (
            json.loads(self.store.read_bytes(key))["attempt"] if self.store.exists(key) else 0
        )
        attempt = int(previous) + 1
        self.store.write_bytes(
            key, json.dumps({"attempt": attempt, "worker": self.worker}).encode()
        )
        return attempt

    def _train(
        self,
        request: TrainingRequested,
        event: Event,
        run_id: str,
        record: Record,
        data: Trainable,
        resume: Checkpoint | None,
        identity: dict[str, Any],
    ) -> TrainingCompleted:
        started = time.perf_counter()
        threads = use_threads(self.torch_threads)
        log.info("trainer: run %s on %d intra-op thread(s)", run_id, threads)
        # The family as installed here; a request that recorded another distribution
        # version of it is refused rather than trained on different code.
        family = resolve(request.family)
        if request.family_origin is not None and family.origin is not None:
            resolve(request.family, request.family_origin)
        elif request.family_origin is not None and request.family_origin.distribution:
            raise FamilyUnavailable(
                f"model family {request.family!r} was requested from "
                f"{request.family_origin.distribution}; this worker has it built in"
            )
        task = cast("Task", task_of(request.family, request.task))  # one of TASKS
        params = hyperparameters(request.family, request.hyperparameters)
        device = resolve_device(request.device)
        if not data.label_column:
            raise InvalidTrainingRequest(f"dataset {data.name} declares no label column")
        features = [c.name for c in data.arrow_schema if c.name != data.label_column]
        if not features:
            raise InvalidTrainingRequest(f"dataset {data.name}@{data.version} has no features")
        columns = [*features, data.label_column]
        # The reader checks the columns are in the file (a StorageError naming them).
        with DatasetReader(self.store, data.uri, data.content_hash, columns=columns) as reader:
            shape = tensor_shape(reader.schema, features)
            x, labels = load_arrays(
                reader,
                num_rows=reader.num_rows,
                features=features,
                label=data.label_column,
                shape=shape,
            )
        input_shape = shape or [len(features)]
        prepared = prepare(
            x,
            labels,
            features=features,
            label=data.label_column,
            seed=request.seed,
            validation=request.split.validation,
            test=request.split.test,
            task=task,
            input_shape=shape,
            feed_shape=family.feed_shape(input_shape),
        )
        del x, labels

        def save(state: Checkpoint) -> None:
            checkpoint.save(self.store, run_id, state, identity)

        def progress(epoch: int, metrics: dict[str, float], rate: float) -> None:
            self.producer.publish(
                TrainingProgress(
                    run_id=run_id,
                    model=request.model,
                    epoch=epoch,
                    max_epochs=request.max_epochs,
                    metrics=metrics,
                    samples_per_second=rate,
                ),
                causation=event,
            )
            self.producer.poll(0)  # delivery is confirmed with the final event, not per epoch

        def pruned() -> int | None:  # a search's trial: has its pruner stopped it?
            return None if request.trial is None else self._prunes.decision(run_id)

        train = fit
        if self._host is not None:
            plan = {
                "run_id": run_id,
                "request": request.model_dump(mode="json"),
                "identity": identity,
                "data": {"uri": data.uri, "content_hash": data.content_hash},
                "features": features,
                "label": data.label_column,
                "device": device,
                # what the members need to read and shape the data as this worker did
                "task": task,
                "shape": shape,
                "feed_shape": list(family.feed_shape(input_shape)),
            }
            # The first attempt needs every member; a restart after a loss goes on with those
            # that come back (the global batch, hence the result, does not depend on them).
            minimum = request.workers if resume is None else 1
            self._host.gather(plan, request.workers, minimum, device)
            train = fit_distributed
        result = train(
            prepared,
            request.family,
            params,
            max_epochs=request.max_epochs,
            seed=request.seed,
            early_stopping=request.early_stopping,
            on_epoch=progress,
            should_stop=lambda: record.stopping or pruned() is not None,
            on_checkpoint=save,
            resume=resume,
            device=device,
            loss=request.loss,
            origin=family.origin,
        )
        decided = pruned() if result.stopped else None
        if decided is not None:
            raise Pruned(run_id, result.epochs, decided)
        if result.stopped:  # shutting down: the checkpoint of the last epoch is on the store
            raise Abandon(f"run {run_id} stopped after epoch {result.epochs}")
        metrics = result.metrics | {
            "inference": inference_latency(result.model, prepared.x["test"])
        }
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak
        dataset = request.dataset.model_copy(update={"version": data.version})
        mean, std = prepared.standardisation.to_lists()
        card = ModelCard(
            family=request.family,
            hyperparameters=params,
            features=features,
            feature_types={c.name: c.type for c in data.arrow_schema},
            label=data.label_column,
            classes=prepared.classes,
            mean=mean,
            std=std,
            metrics=metrics,
            dataset=dataset,
            run_id=run_id,
            torch_version=torch.__version__,
            device=device,
            task=task,
            family_origin=family.origin,
            input_shape=shape,
            target_mean=prepared.target_mean if task == "regression" else None,
            target_std=prepared.target_std if task == "regression" else None,
        )
        saved = artifacts.save(self.store, f"models/{request.model}/{run_id}", result.model, card)
        return TrainingCompleted(
            run_id=run_id,
            model=request.model,
            version=run_id[:12],
            request_id=event.id,
            family=request.family,
            dataset=dataset,
            artifact=Artifact(**saved),
            metrics=metrics,
            confusion_matrix=result.confusion_matrix,
            labels=prepared.classes or None,
            hyperparameters=params,
            seed=request.seed,
            epochs=result.epochs,
            code=CodeVersion(
                package_version=mlbus.__version__, git_commit=os.environ.get("MLBUS_GIT_COMMIT")
            ),
            torch_version=torch.__version__,
            device=device,
            duration_seconds=time.perf_counter() - started,
            peak_memory_bytes=peak,
            task=task,
            family_origin=family.origin,
            input_shape=input_shape,
            world_size=self._host.world if self._host else 1,
        )

    def _completion(self, completed: TrainingCompleted, event: Event, run_id: str) -> Event:
        """The `training.completed` of a run: the same event id however often it is sent."""
        return wrap(
            completed,
            source=self.producer.source,
            causation=event,
            event_id=str(uuid.uuid5(_NAMESPACE, f"{run_id}/completed")),
        )

    def _failure(
        self,
        request: TrainingRequested,
        event: Event,
        run_id: str,
        reason: str,
        error_type: str,
        *,
        pruned: bool = False,
        epoch: int | None = None,
    ) -> Event:
        """The final `training.failed` of a run (not retryable; one id per run)."""
        return wrap(
            TrainingFailed(
                run_id=run_id,
                model=request.model,
                request_id=event.id,
                reason=reason,
                retryable=False,
                error_type=error_type,
                epoch=epoch,
                pruned=pruned,
            ),
            source=self.producer.source,
            causation=event,
            event_id=str(uuid.uuid5(_NAMESPACE, f"{run_id}/failed")),
        )

    def _finish(self, outcome: Event, record: Record) -> None:
        """Publish a run's outcome, with the request's offset in the same transaction when
        transactions are on (mlbus/kafka/transaction.py says what that guarantees where)."""
        if self.transactions is not None and record.group_metadata() is not None:
            self.transactions.finish(record, [outcome])
            return
        if self._on_log(outcome.id):
            # Published by a worker that died before committing the request's offset: the
            # loop commits it now, and the log keeps the one copy.
            log.info("trainer: %s %s is on the log already", outcome.type, outcome.id)
            return
        self.producer.send(outcome)
        self.producer.flush()
        self._published.add(outcome.id)

    def _on_log(self, event_id: str) -> bool:
        """Whether an outcome with this id was published (read up to the log's end now:
        everything a dead worker had acknowledged is there)."""
        if event_id in self._published:
            return True
        for item in self._outcomes.catch_up(timeout=60):
            self._published.add(item.event.id)
        return event_id in self._published

    def _notice(
        self,
        request: TrainingRequested,
        event: Event,
        run_id: str,
        reason: str,
        error_type: str,
        retry: int,
    ) -> None:
        """A retryable `training.failed`: the run is not over (an id per retry, so the
        notices are not taken for duplicates)."""
        self.producer.publish(
            TrainingFailed(
                run_id=run_id,
                model=request.model,
                request_id=event.id,
                reason=reason,
                retryable=True,
                error_type=error_type,
            ),
            causation=event,
            event_id=str(uuid.uuid5(_NAMESPACE, f"{run_id}/failed/{self.worker}/{retry}")),
        )
        self.producer.flush()
