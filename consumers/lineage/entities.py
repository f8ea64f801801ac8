"""The answers of the lineage queries (queries.py): plain frozen dataclasses, never ORM rows,
so a caller turns them into JSON with `dataclasses.asdict`. No topics and no SQL here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Provenance:
    event_id: str
    topic: str
    partition: int
    offset: int
    time: str | None


@dataclass(frozen=True)
class DatasetNode:
    name: str
    version: str
    known: bool
    """False: no dataset.created for this version (as of the query): an unknown upstream"""
    uri: str | None = None
    content_hash: str | None = None
    num_rows: int | None = None
    created_by: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    parents: list[DatasetNode] = field(default_factory=list)
    truncated: bool = False
    provenance: Provenance | None = None


@dataclass(frozen=True)
class Epoch:
    epoch: int
    max_epochs: int
    metrics: dict[str, float]
    event_id: str


@dataclass(frozen=True)
class Run:
    run_id: str | None
    status: str  # completed, failed, started, requested, unknown
    request_id: str | None = None
    family: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    epochs: int | None = None
    code_version: str | None = None
    git_commit: str | None = None
    requested_by: str | None = None
    pipeline: str | None = None
    correlationid: str | None = None
    worker: str | None = None
    attempt: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact_uri: str | None = None
    artifact_sha256: str | None = None
    duration_seconds: float | None = None
    failure: str | None = None
    progress: list[Epoch] = field(default_factory=list)
    events: list[Provenance] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    kind: str  # promoted, rejected
    model: str
    version: str
    reason: str
    actor: str
    policy: str | None
    evidence: dict[str, Any]
    rollback: bool
    previous_version: str | None
    champion_version: str | None
    run_id: str | None
    provenance: Provenance


@dataclass(frozen=True)
class Deployment:
    replica: str
    version: str
    status: str
    error: str | None
    provenance: Provenance


@dataclass(frozen=True)
class Upstream:
    model: str
    version: str
    as_of: str | None
    serving: bool
    """True when a replica served this version as of the query (deployment.updated says
    loaded); a promotion alone is not serving"""
    run: Run
    datasets: list[DatasetNode]
    decisions: list[Decision]
    deployments: list[Deployment]
    provenance: Provenance | None
    """the training.completed that produced the version; None if not (yet) seen"""
    replicas: list[str] = field(default_factory=list)
    """the replicas serving this version"""
    load_failure: str | None = None
    """why it does not serve: the newest reason a replica gave for failing to load it"""


@dataclass(frozen=True)
class ModelUse:
    model: str
    version: str | None
    run_id: str | None
    status: str
    serving_now: bool
    """a replica serves this version (as of the query)"""
    replicas: list[str]
    decisions: list[str]
    provenance: Provenance


@dataclass(frozen=True)
class DatasetUse:
    name: str
    version: str
    known: bool
    derived: list[str]
    uses: list[ModelUse]


@dataclass(frozen=True)
class Downstream:
    dataset: str
    as_of: str | None
    versions: list[DatasetUse]


@dataclass(frozen=True)
class Why:
    model: str
    version: str
    known_version: bool
    decisions: list[Decision]


@dataclass(frozen=True)
class Champion:
    """The newest promotion of a model: the version decided on. It serves once a replica
    loads it (`ModelSummary.serving`); one that failed to load never does."""

    version: str
    since: str | None
    actor: str
    reason: str
    rollback: bool
    policy: dict[str, Any] | None
    event_id: str


@dataclass(frozen=True)
class ModelVersion:
    version: str
    status: str  # champion, rolled back, promoted before, rejected, candidate
    run_id: str | None
    trained_at: str | None
    dataset: dict[str, str] | None
    metrics: dict[str, float]
    """flat: "test.accuracy", "inference.latency_p95_ms", ... (unmeasured ones left out)"""
    rejected: str | None
    """the reason of the newest rejection, if the policy rejected it"""
    serving: bool = False
    """a replica serves it (deployment.updated says loaded)"""
    replicas: list[str] = field(default_factory=list)
    """the replicas serving it"""
    load_failure: str | None = None
    """not serving because it failed to load: the newest reason a replica gave"""


@dataclass(frozen=True)
class ModelSummary:
    model: str
    champion: Champion | None
    versions: list[ModelVersion]
    serving: str | None = None
    """the version the replicas serve (the newest loaded); may differ from the champion:
    one that is still loading, or failed to load while its predecessor keeps serving"""
    replicas: dict[str, str] = field(default_factory=dict)
    """replica → the version it serves"""


@dataclass(frozen=True)
class RecentEvent:
    time: str | None
    type: str
    id: str
    subject: str | None
