"""What the workflow manager knows, as a projection of the log: pipelines in force, runs,
sweeps, the promotion history of each model (its champion), and which decisions are
already in the log. Rebuilt from the log at start (`rebuild`); the service then keeps it
up to date from the same topics. There are no SQL tables: the log is the only state, so a
restart can never disagree with it.

Applying an event is idempotent (by event id, and for promotions by log position), so the
records a consumer group redelivers after a restart change nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView
from mlbus.schemas.datasets import DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.traffic import ModelTraffic
from mlbus.schemas.training import (
    DEADLINE_EXCEEDED,
    Split,
    TrainingCompleted,
    TrainingFailed,
    TrainingRequested,
)
from mlbus.schemas.workflow import PipelineDefined

_NAMESPACE = uuid.UUID("3c9a1f52-8f0e-4b0a-b7b5-2f6f4f1f9c21")
#: Topics the state is built from, in the order a rebuild applies them.
TOPICS = (
    "pipeline.defined", "dataset.validated", "training.requested", "search.requested",
    "search.completed", "training.completed", "training.failed", "model.promoted",
    "model.rejected", "model.traffic",
)  # fmt: skip
#: The workflow's own actor name in decisions (manual ones carry the user's).
ACTOR = "mlbus/workflow"

Position = tuple[int, int]  # (partition, offset): ordered within one entity's partition


def decision_id(completed_id: str) -> str:
    """The id of the promotion or rejection decided for one `training.completed`."""
    return str(uuid.uuid5(_NAMESPACE, f"decision/{completed_id}"))


def request_id(pipeline: str, validated_id: str, index: int) -> str:
    """The id of the `training.requested` a pipeline publishes for one sweep point."""
    return str(uuid.uuid5(_NAMESPACE, f"request/{pipeline}/{validated_id}/{index}"))


def deadline_id(request_id: str) -> str:
    """The id of the `training.failed` declaring a sweep's run failed at the deadline."""
    return str(uuid.uuid5(_NAMESPACE, f"deadline/{request_id}"))


def past_deadline(event: Event) -> bool:
    """A `training.failed` the workflow published at a sweep's deadline."""
    data = event.data
    return isinstance(data, TrainingFailed) and data.error_type == DEADLINE_EXCEEDED


def rollback_id(alert_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"rollback/{alert_id}"))


def time_of(event: Event) -> datetime:
    return event.time if event.time is not None else datetime.now(UTC)


@dataclass
class Pipeline:
    defined: PipelineDefined
    event_id: str
    #: versions validated before this time never trigger it (it did not exist, or was off)
    since: datetime


@dataclass
class Promotion:
    event_id: str
    data: ModelPromoted
    time: datetime
    position: Position | None  # None: published by this process, not yet read back


@dataclass
class Model:
    name: str
    runs: dict[str, Event] = field(default_factory=dict)  # version → training.completed
    promotions: list[Promotion] = field(default_factory=list)  # in log order
    last_position: Position | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # version → reason
    #: its newest model.traffic event (a rollout in progress, or the last one, ended)
    traffic: Event[ModelTraffic] | None = None

    @property
    def rollout(self) -> Event[ModelTraffic] | None:
        """The rollout in progress (None: none)."""
        return self.traffic if self.traffic is not None and self.traffic.data.active else None

    @property
    def champion(self) -> Promotion | None:
        return self.promotions[-1] if self.promotions else None

    def rolled_back(self) -> set[str]:
        """Versions a rollback moved away from: never a rollback target again."""
        return {
            p.data.previous_version
            for p in self.promotions
            if p.data.rollback and p.data.previous_version
        }

    def previous_good(self) -> Promotion | None:
        """The newest earlier promotion of another version that was not rolled back from."""
        champion = self.champion
        if champion is None:
            return None
        bad = self.rolled_back() | {champion.data.version}
        return next((p for p in reversed(self.promotions) if p.data.version not in bad), None)

    def last_automatic_rollback(self) -> datetime | None:
        times = [p.time for p in self.promotions if p.data.rollback and p.data.actor == ACTOR]
        return max(times) if times else None


@dataclass
class Sweep:
    size: int
    outcomes: dict[str, Event] = field(default_factory=dict)  # request id → completed/failed
    requests: dict[str, Event] = field(default_factory=dict)  # request id → training.requested
    #: the deadline the requests carry (the earliest), and when the first was requested
    deadline: datetime | None = None
    requested: datetime | None = None

    @property
    def finished(self) -> bool:
        return len(self.outcomes) >= self.size

    def due(self, default_seconds: float) -> datetime | None:
        """When runs still missing are declared failed: the requests' deadline, else
        `default_seconds` after the first request; None before any request is known."""
        if self.deadline is not None:
            return self.deadline
        if self.requested is None:
            return None
        return self.requested + timedelta(seconds=default_seconds)

    def missing(self) -> list[Event]:
        """The requests known without an outcome, by sweep index."""
        waiting = [e for rid, e in self.requests.items() if rid not in self.outcomes]
        return sorted(waiting, key=lambda e: e.data.sweep.index)

    def record(self, event: Event) -> None:
        """An outcome of one of its runs. A retryable failure is not one (the worker retries);
        a deadline failure is final, whatever arrives for that run before or after it, so the
        sweep's outcomes do not depend on the order of the two topics."""
        data: TrainingCompleted | TrainingFailed = event.data
        if isinstance(data, TrainingFailed) and data.retryable:
            return
        current = self.outcomes.get(data.request_id)
        if current is not None and past_deadline(current):
            return
        self.outcomes[data.request_id] = event


@dataclass
class State:
    pipelines: dict[str, Pipeline] = field(default_factory=dict)
    requests: dict[str, TrainingRequested] = field(default_factory=dict)
    models: dict[str, Model] = field(default_factory=dict)
    sweeps: dict[str, Sweep] = field(default_factory=dict)
    #: ids of every decision in the log (promotions, rejections, requests): never made twice
    decided: set[str] = field(default_factory=set)
    #: dataset.validated id → (position, event): what triggers may still act on
    validated: dict[str, tuple[Position, Event]] = field(default_factory=dict)
    #: pipeline → position of the dataset.validated that last triggered it
    last_trigger: dict[str, Position] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)

    def model(self, name: str) -> Model:
        if name not in self.models:
            self.models[name] = Model(name)
        return self.models[name]

    def pipeline_for(self, model: str, request: TrainingRequested | None) -> Pipeline | None:
        """The pipeline governing a run: the one that requested it, else the one (enabled)
        that trains this model."""
        if request is not None and request.pipeline in self.pipelines:
            found = self.pipelines[request.pipeline]
            return found if found.defined.enabled else None
        return next(
            (
                p
                for _, p in sorted(self.pipelines.items())
                if p.defined.enabled and p.defined.model == model
            ),
            None,
        )

    def split_of(self, completed: TrainingCompleted) -> Split:
        request = self.requests.get(completed.request_id)
        return request.split if request is not None else Split()

    # -- applying events (idempotent) -----------------------------------------------------

    def apply(self, event: Event, position: Position | None = None) -> bool:
        """Apply one event of `TOPICS`; False if it was applied before (a redelivery)."""
        if event.type == "model.promoted":
            return self._promoted(event, position)
        if event.id in self._seen:
            return False
        self._seen.add(event.id)
        data = event.data
        if event.type == "pipeline.defined":
            self._defined(event, data)
        elif event.type == "dataset.validated":
            if position is not None:
                self.validated[event.id] = (position, event)
        elif event.type == "training.requested":
            self.decided.add(event.id)
            self.requests[event.id] = data
            if data.sweep is not None:
                self._requested(event, data)
            trigger = self.validated.get(event.causationid or "")
            if data.pipeline and trigger is not None:
                before = self.last_trigger.get(data.pipeline)
                if before is None or trigger[0] > before:
                    self.last_trigger[data.pipeline] = trigger[0]
        elif event.type == "search.requested":
            # A pipeline's search is its trigger of that version, like a run request.
            self.decided.add(event.id)
            trigger = self.validated.get(event.causationid or "")
            if data.pipeline and trigger is not None:
                before = self.last_trigger.get(data.pipeline)
                if before is None or trigger[0] > before:
                    self.last_trigger[data.pipeline] = trigger[0]
        elif event.type == "search.completed":
            # A search's sweep is as large as the trials it requested: fewer than its budget
            # when the wall clock ended it.
            sweep = self.sweeps.setdefault(data.search_id, Sweep(data.trials))
            sweep.size = data.trials
        elif event.type in ("training.completed", "training.failed"):
            self._outcome(event, data)
        elif event.type == "model.rejected":
            self.decided.add(event.id)
            self.model(data.model).rejected[data.version] = data.reason
        elif event.type == "model.traffic":
            self.decided.add(event.id)
            self.model(data.model).traffic = event
        return True

    def _defined(self, event: Event, data: PipelineDefined) -> None:
        current = self.pipelines.get(data.name)
        if current is not None and data.revision < current.defined.revision:
            return
        switched_on = current is None or not current.defined.enabled
        since = time_of(event) if switched_on or current is None else current.since
        self.pipelines[data.name] = Pipeline(data, event.id, since)

    def _outcome(self, event: Event, data: TrainingCompleted | TrainingFailed) -> None:
        if isinstance(data, TrainingCompleted):
            self.model(data.model).runs[data.version] = event
        if past_deadline(event):
            self.decided.add(event.id)
        request = self.requests.get(data.request_id)
        if request is not None and request.sweep is not None:
            sweep = self.sweeps.setdefault(request.sweep.sweep_id, Sweep(request.sweep.size))
            sweep.record(event)

    def _requested(self, event: Event, data: TrainingRequested) -> None:
        assert data.sweep is not None
        sweep = self.sweeps.setdefault(data.sweep.sweep_id, Sweep(data.sweep.size))
        sweep.requests[event.id] = event
        at = time_of(event)
        sweep.requested = at if sweep.requested is None else min(sweep.requested, at)
        if data.sweep.deadline is not None:
            deadline = data.sweep.deadline
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=UTC)
            sweep.deadline = deadline if sweep.deadline is None else min(sweep.deadline, deadline)

    def _promoted(self, event: Event[ModelPromoted], position: Position | None) -> bool:
        data: ModelPromoted = event.data
        model = self.model(data.model)
        self.decided.add(event.id)
        if position is None:  # our own, published just now: provisional until read back
            if any(p.event_id == event.id for p in model.promotions):
                return False
        elif model.last_position is not None and position <= model.last_position:
            return False  # read before (a redelivery after a rebuild)
        else:
            model.last_position = position
        # Later in the log wins: a decision read back moves to its place in the log order.
        model.promotions = [p for p in model.promotions if p.event_id != event.id]
        model.promotions.append(Promotion(event.id, data, time_of(event), position))
        return True

    # -- triggers ---------------------------------------------------------------------------

    def matches(self, pipeline: Pipeline, validated: Event[DatasetValidated]) -> bool:
        data: DatasetValidated = validated.data
        spec = pipeline.defined
        return (
            spec.enabled
            and data.name == spec.dataset
            and all(data.tags.get(k) == v for k, v in spec.tags.items())
            and time_of(validated) >= pipeline.since
        )

    def untriggered(self, pipeline: Pipeline) -> list[tuple[Position, Event]]:
        """Matching validated versions newer than the pipeline's last trigger, oldest first."""
        last = self.last_trigger.get(pipeline.defined.name)
        found = [
            (position, event)
            for position, event in self.validated.values()
            if self.matches(pipeline, event) and (last is None or position > last)
        ]
        return sorted(found, key=lambda item: item[0])


def read_state(kafka: KafkaConfig, topics: Iterable[str] = TOPICS) -> State:
    """The state as of the end of the log (a group-less read: changes nobody's offsets)."""
    with LogView(kafka, list(topics), name="workflow state") as view:
        items = view.catch_up()
    state = State()
    # Causes before effects, whatever order the topics were read in.
    order = {t: i for i, t in enumerate(TOPICS)}
    applied = [i for i in items if i.topic in order]
    for item in sorted(applied, key=lambda i: (order[i.topic], i.position)):
        state.apply(item.event, item.position)
    return state
