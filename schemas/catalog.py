"""The topic catalog: the public contract of mlbus. One entry per topic — its payload model,
record key, partitions and retention — and the registry derived from it that maps an event
`type` to its typed event model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import Field, TypeAdapter, create_model

from mlbus.schemas.base import Payload
from mlbus.schemas.datasets import DatasetCreated, DatasetValidated
from mlbus.schemas.deadletter import DeadLetter
from mlbus.schemas.envelope import Event
from mlbus.schemas.errors import UnknownTopic
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted, ModelRejected
from mlbus.schemas.search import SearchCompleted, SearchRequested, TrialPruned
from mlbus.schemas.serving import (
    InferenceFeedback,
    InferenceLogged,
    InferenceRequest,
    InferenceResult,
    ServingAccuracy,
    ServingAlert,
    ServingMetrics,
)
from mlbus.schemas.traffic import ModelTraffic
from mlbus.schemas.training import (
    TrainingCompleted,
    TrainingFailed,
    TrainingProgress,
    TrainingRequested,
    TrainingStarted,
)
from mlbus.schemas.workflow import PipelineDefined

FOREVER = -1
DAY_MS = 24 * 3600 * 1000
DEADLETTER = "mlbus.deadletter"


def min_insync_replicas(replicas: int) -> int:
    """How many of a topic's `replicas` an acks=all write needs in sync: 2 of 3 or more (one
    broker may be down), 1 where there are fewer than 3. Every topic mlbus creates follows
    it, the catalog's and the stream processors' changelogs alike."""
    return 2 if replicas >= 3 else 1


@dataclass(frozen=True)
class TopicSpec:
    name: str
    payload: type[Payload]
    key: str | None
    """payload field whose value is the record key; None = the original record's key"""
    partitions: int
    description: str
    published_by: str
    retention_ms: int = FOREVER
    cleanup_policy: str = "delete"
    replication: int = 3
    max_message_bytes: int | None = None

    def replication_on(self, brokers: int) -> int:
        """The replication factor on a cluster of `brokers`: the catalog's, or what a smaller
        cluster can hold."""
        return min(self.replication, max(1, brokers))

    def configs(self, replication: int | None = None) -> dict[str, str]:
        """Topic-level configs as Kafka names them, for a topic with `replication` replicas
        (default the catalog's), `min.insync.replicas` by `min_insync_replicas`."""
        replicas = replication or self.replication
        out = {
            "retention.ms": str(self.retention_ms),
            "cleanup.policy": self.cleanup_policy,
            "min.insync.replicas": str(min_insync_replicas(replicas)),
        }
        if self.max_message_bytes:
            out["max.message.bytes"] = str(self.max_message_bytes)
        return out

    def key_of(self, data: Payload) -> str | None:
        return None if self.key is None else str(getattr(data, self.key))


# Lineage topics are kept forever: the log is the source of truth (the archive keeps a copy).
CATALOG: tuple[TopicSpec, ...] = (
    TopicSpec("dataset.created", DatasetCreated, "name", 3,
              "a new immutable dataset version exists", "datasets, upstream systems"),
    TopicSpec("dataset.validated", DatasetValidated, "name", 3,
              "a dataset.created checked against its bytes (hash, schema, rows, version), with "
              "its column statistics", "datasets"),
    TopicSpec("training.requested", TrainingRequested, "model", 6,
              "train this spec on this dataset version (a search's trial is keyed by its own "
              "request id, so that a search's trials spread over the trainer workers)",
              "workflow, CLI/API, tuning"),
    TopicSpec("training.started", TrainingStarted, "model", 6,
              "a worker took a request", "trainer"),
    TopicSpec("training.progress", TrainingProgress, "model", 6,
              "per-epoch metrics of a run", "trainer", retention_ms=30 * DAY_MS),
    TopicSpec("training.completed", TrainingCompleted, "model", 6,
              "artifact, metrics and provenance of a finished run", "trainer"),
    TopicSpec("training.failed", TrainingFailed, "model", 6,
              "a run failed (reason, retryable)", "trainer"),
    TopicSpec("search.requested", SearchRequested, "model", 3,
              "a hyperparameter search (space, sampler, pruner, objective, budget)",
              "CLI/API, workflow"),
    TopicSpec("search.pruned", TrialPruned, "model", 6,
              "the pruner stopped a search's trial after an epoch", "tuning"),
    TopicSpec("search.completed", SearchCompleted, "model", 3,
              "a search is over: trials requested, their outcomes, the best trial", "tuning"),
    TopicSpec("pipeline.defined", PipelineDefined, "name", 1,
              "a pipeline definition (trigger, sweep, promotion policy) as applied",
              "workflow CLI/API"),
    TopicSpec("model.promoted", ModelPromoted, "model", 3,
              "this version now serves (policy, evidence; rollbacks too)", "workflow, CLI/API"),
    TopicSpec("model.rejected", ModelRejected, "model", 3,
              "a candidate failed the policy", "workflow"),
    TopicSpec("model.traffic", ModelTraffic, "model", 3,
              "how requests are split between a stable version and a candidate (canary, "
              "shadow, A/B), with the analysis that changed it", "workflow, CLI/API"),
    TopicSpec("deployment.updated", DeploymentUpdated, "model", 3,
              "a replica loaded (or failed to load) a version", "serving"),
    TopicSpec("inference.requests", InferenceRequest, "request_id", 6,
              "stream inference requests", "clients", retention_ms=7 * DAY_MS),
    TopicSpec("inference.results", InferenceResult, "request_id", 6,
              "stream inference results", "serving", retention_ms=7 * DAY_MS),
    TopicSpec("inference.logged", InferenceLogged, "model", 6,
              "sampled prediction records", "serving", retention_ms=7 * DAY_MS),
    TopicSpec("inference.feedback", InferenceFeedback, "model", 6,
              "delayed labels: the true label or value of an answered request",
              "clients, serving", retention_ms=7 * DAY_MS),
    TopicSpec("serving.accuracy", ServingAccuracy, "model", 3,
              "windowed online accuracy / RMSE per model version, from feedback", "streams",
              retention_ms=90 * DAY_MS),
    TopicSpec("serving.metrics", ServingMetrics, "model", 3,
              "windowed metrics per model version", "streams", retention_ms=90 * DAY_MS),
    TopicSpec("serving.alert", ServingAlert, "model", 3,
              "threshold breaches and recoveries", "streams"),
    TopicSpec(DEADLETTER, DeadLetter, None, 3,
              "records a consumer could not process, kept whole with the reason", "any consumer",
              retention_ms=90 * DAY_MS, max_message_bytes=16 * 1024 * 1024),
)  # fmt: skip

TOPICS: dict[str, TopicSpec] = {spec.name: spec for spec in CATALOG}
_BY_PAYLOAD: dict[type[Payload], TopicSpec] = {spec.payload: spec for spec in CATALOG}


def _event_model(spec: TopicSpec) -> type[Event]:
    class_name = "".join(part.title() for part in spec.name.replace(".", "_").split("_"))
    return create_model(
        f"{class_name}Event",
        __base__=Event[spec.payload],  # type: ignore[name-defined]  # a run-time payload class
        __module__=__name__,
        type=(Literal[spec.name], Field(description="equals the topic name")),  # type: ignore[arg-type]  # a run-time literal
    )


EVENT_MODELS: dict[str, type[Event]] = {spec.name: _event_model(spec) for spec in CATALOG}

#: Validates any event of the contract in one pass, choosing the model by `type`.
ANY_EVENT: TypeAdapter[Event] = TypeAdapter(
    Annotated[Union[tuple(EVENT_MODELS.values())], Field(discriminator="type")]  # type: ignore[arg-type]  # noqa: UP007  # a run-time union
)


def topic(name: str) -> TopicSpec:
    try:
        return TOPICS[name]
    except KeyError:
        raise UnknownTopic(
            f"unknown topic {name!r}; the contract has: {', '.join(TOPICS)}"
        ) from None


def spec_for_payload(payload: Payload | type[Payload]) -> TopicSpec:
    cls = payload if isinstance(payload, type) else type(payload)
    try:
        return _BY_PAYLOAD[cls]
    except KeyError:
        raise UnknownTopic(f"{cls.__name__} is not the payload of any topic") from None
