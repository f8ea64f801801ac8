"""The service manifests: each long-running service of the platform declared once — its
name, consumer group, CloudEvents source, the topics it reads and writes, the entry point
that builds and runs it, how its health is checked and how it is deployed.

Everything that knows about services derives from `SERVICES`: the supervisor of `mlbus up`
(one `mlbus run <name>` process each), `mlbus run <name>` itself (what a container runs),
the compose and Kubernetes files of infra/ (`mlbus services export`, `make infra`, rendered
by mlbus/deploy.py) and the README's service table (`python -m mlbus.docs`).

This module is data. `build` names the composition-root function as a "module:function"
string so that the kernel imports no component; components may read their own manifest
(group id, source) from here.

Group ids follow one scheme: `<topic prefix>mlbus-<name>` (`group_id`), so that several
stacks sharing a cluster through MLBUS_TOPIC_PREFIX never share a group either.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlbus.errors import ConfigError
from mlbus.schemas.catalog import DEADLETTER, TOPICS
from mlbus.settings import Settings


@dataclass(frozen=True)
class HttpCheck:
    """Healthy when `GET path` on the service's port answers 2xx; ready when `GET ready`
    does. Ports and interfaces are settings (dotted paths into `Settings`, e.g.
    `serving.port`); port 0 turns the server, and so this check, off."""

    port: str
    path: str
    """answers once the process serves (the liveness check)"""
    ready: str | None = None
    """answers once it can take traffic (what `mlbus up` waits for, Kubernetes readiness);
    default `path`"""

    @property
    def ready_path(self) -> str:
        return self.ready or self.path

    host: str | None = None
    """setting naming the interface it listens on; None: it listens on every interface"""

    def port_of(self, cfg: Settings) -> int:
        return int(_setting(cfg, self.port))

    def base_url(self, cfg: Settings) -> str | None:
        """Where the service answers on this host; None when its port is 0 (off)."""
        port = self.port_of(cfg)
        if not port:
            return None
        host = _setting(cfg, self.host) if self.host else "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{port}"


@dataclass(frozen=True)
class Metrics:
    """Where the service's Prometheus metrics are: `GET path` on the port a setting names
    (dotted path into `Settings`); port 0 turns them off. Every registry holds the process,
    platform and GC collectors and the consumer lag of the service's groups (mlbus/metrics.py)."""

    port: str
    path: str = "/metrics"
    own_server: bool = True
    """True: `mlbus run` starts a small HTTP server for them (the service has none);
    False: the service's own HTTP server answers `path`"""

    def port_of(self, cfg: Settings) -> int:
        return int(_setting(cfg, self.port))


@dataclass(frozen=True)
class Deployment:
    """How a container platform runs the service (infra/docker-compose.yml, infra/k8s)."""

    scale: str
    """how far and by what it scales: the comment next to its Kubernetes Deployment"""
    replicas: int = 1
    grace_seconds: int = 30
    """SIGTERM to SIGKILL: in-flight work is finished and offsets committed in between"""
    cpu: str = "500m"
    """CPU requested; the limit is twice it (a burst, never a throttled steady state)"""
    memory: str = "1Gi"
    """memory requested, and its limit"""
    max_replicas: int | None = None
    """scaled by a horizontal pod autoscaler on CPU, from `replicas` up to this; None: not"""
    min_available: int | None = None
    """a PodDisruptionBudget keeps this many replicas through voluntary disruptions"""


@dataclass(frozen=True)
class Service:
    name: str
    """what `mlbus run`, `mlbus up --only`, compose and Kubernetes call it"""
    folder: str
    """where its code lives (README)"""
    role: str
    source: str
    """CloudEvents `source` of what it publishes"""
    reads: tuple[str, ...]
    """contract topics it consumes or replays"""
    writes: tuple[str, ...]
    """contract topics it publishes to"""
    build: str
    """"module:function" of the composition root that builds and runs it in the
    foreground: `function(service, settings) -> exit code | None`"""
    deployment: Deployment
    metrics: Metrics
    """its /metrics (every service has one)"""
    health: HttpCheck | None = None
    """None: healthy while its process lives"""
    group: bool = True
    """whether it consumes in a consumer group (`group_id`); False: group-less readers only"""
    keeps: str = ""
    """what it writes besides topics, if anything (README)"""
    enabled_by: str | None = None
    """setting (dotted path) that must be true for `mlbus up` to start it; None: always.
    `mlbus run <name>` starts it regardless (and fails clearly if it is not configured)."""
    fetch_wait_ms: int | None = 2000
    """on the embedded broker, how long a fetch of its following librdkafka consumers waits
    (fetch.wait.max.ms, unless MLBUS_KAFKA__FETCH_WAIT_MAX_MS is set). The broker looks for
    new records at the start of a waiting fetch, then halfway through the wait and a few
    times more near its end (docs/broker.md), so a record waits at most half of it (from
    500 ms up): a wait of 2 s means a reaction within a second. Each look costs the broker
    time per partition the fetch names, so this is what the service's idle polling costs.
    Lookups (views read to the end, then left) wait only briefly whatever this says, and
    where `mlbus up` keeps a journal its idle consumers stop fetching (mlbus/kafka/quiet.py)
    and wait at most 500 ms while records flow (mlbus/kafka/config.py). None: the embedded
    profile's 10 ms. (faust's aiokafka consumer waits its own 1.5 s.)"""

    def enabled(self, cfg: Settings) -> bool:
        return self.enabled_by is None or bool(_setting(cfg, self.enabled_by))

    def group_id(self, prefix: str = "") -> str:
        """Its consumer group: `<topic prefix>mlbus-<name>`."""
        return f"{prefix}mlbus-{self.name}"

    def entry(self) -> Callable[[Service, Settings], int | None]:
        """The composition-root function named by `build`, imported now."""
        module, _, function = self.build.partition(":")
        entry: Callable[[Service, Settings], int | None] = getattr(
            importlib.import_module(module), function
        )
        return entry


def _setting(cfg: Settings, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


_EVERY_TOPIC = tuple(TOPICS)
_TRAINING = ("training.started", "training.progress", "training.completed", "training.failed")

#: Every service, in start order (`mlbus up` stops them in reverse: the API first).
SERVICES: tuple[Service, ...] = (
    Service(
        "validator",
        folder="datasets/",
        role="checks each new dataset version against its bytes (hash, schema, rows, "
        "version) and adds missing column statistics",
        source="mlbus/datasets",
        reads=("dataset.created", "dataset.validated"),
        writes=("dataset.validated", DEADLETTER),
        build="mlbus.cli.datasets:run_validator",
        metrics=Metrics(port="metrics.validator_port"),
        deployment=Deployment(
            "up to dataset.created's partitions (3); each replica validates its share."
        ),
    ),
    Service(
        "trainer",
        folder="trainer/",
        role="training workers: Arrow → torch, checkpoints, artifacts",
        source="mlbus/trainer",
        reads=("training.requested", "dataset.validated", "dataset.created", DEADLETTER),
        writes=(*_TRAINING, DEADLETTER),
        build="mlbus.cli.training:run_trainer",
        keeps="artifacts, checkpoints",
        metrics=Metrics(port="metrics.trainer_port"),
        deployment=Deployment(
            "up to training.requested's partitions (6) — one run at a time per replica; more "
            "replicas than partitions sit idle. Give each the CPU/GPU a run needs.",
            replicas=2,
            grace_seconds=60,
            cpu="2",
            memory="4Gi",
        ),
    ),
    Service(
        "workflow",
        folder="consumers/workflow/",
        role="pipelines, triggers, promotion policy, rollouts (canary steps), rollback",
        source="mlbus/workflow",
        reads=(
            "pipeline.defined",
            "dataset.created",
            "dataset.validated",
            "training.requested",
            "search.requested",
            "search.completed",
            "training.completed",
            "training.failed",
            "model.promoted",
            "model.rejected",
            "model.traffic",
            "deployment.updated",
            "serving.alert",
            "serving.metrics",
            "serving.accuracy",
        ),
        writes=(
            "training.requested",
            "search.requested",
            "training.failed",
            "model.promoted",
            "model.rejected",
            "model.traffic",
            DEADLETTER,
        ),
        build="mlbus.cli.workflow:run_workflow",
        metrics=Metrics(port="metrics.workflow_port"),
        deployment=Deployment(
            "1. Decisions (debounce, sweeps, champion comparison) need one view per model; a "
            "second replica only takes over partitions on failure."
        ),
        fetch_wait_ms=2000,  # a decision within a second of a completion
    ),
    Service(
        "tuning",
        folder="consumers/tuning/",
        role="hyperparameter searches on Optuna: trials requested, epochs pruned; the study "
        "is the log",
        source="mlbus/tuning",
        reads=(
            "search.requested",
            "search.pruned",
            "search.completed",
            "training.requested",
            "training.progress",
            "training.completed",
            "training.failed",
        ),
        writes=("training.requested", "search.pruned", "search.completed"),
        build="mlbus.cli.tuning:run_tuning",
        metrics=Metrics(port="metrics.tuning_port"),
        deployment=Deployment(
            "exactly 1: it replays the search topics on start (no group, no store) and decides "
            "for every search; a second replica only repeats decisions (same event ids).",
            cpu="200m",
            memory="512Mi",
        ),
        group=False,
    ),
    Service(
        "lineage",
        folder="consumers/lineage/",
        role="metadata store: SQL projection of the log, lineage queries, audit",
        source="mlbus/lineage",
        reads=(
            "dataset.created",
            "dataset.validated",
            "training.requested",
            *_TRAINING,
            "pipeline.defined",
            "model.promoted",
            "model.rejected",
            "model.traffic",
            "deployment.updated",
            "serving.alert",
        ),
        writes=(),
        build="mlbus.cli.lineage:run_lineage",
        keeps="SQL",
        metrics=Metrics(port="metrics.lineage_port"),
        deployment=Deployment(
            "up to the partitions of the contract topics (3); the store is PostgreSQL "
            "(MLBUS_METADATA_URL), positions are kept with the rows."
        ),
    ),
    Service(
        "archive",
        folder="consumers/archive/",
        role="the log on the object store as Parquet, for years",
        source="mlbus/archive",
        reads=_EVERY_TOPIC,
        writes=(),
        build="mlbus.cli.archive:run_archive",
        keeps="Parquet",
        metrics=Metrics(port="metrics.archive_port"),
        deployment=Deployment(
            "up to the contract topics' partitions; each replica archives its partitions "
            "exactly once."
        ),
        # Files are cut by size or by age (archive.flush_seconds, a minute): its fetch over
        # every partition need not look often, and it is the one that names the most.
        fetch_wait_ms=5000,
    ),
    Service(
        "openlineage",
        folder="consumers/openlineage/",
        role="OpenLineage run events (datasets, training runs, promotions, deployments) to "
        "Marquez or a Kafka topic",
        source="mlbus/openlineage",
        reads=(
            "dataset.created",
            "dataset.validated",
            "training.requested",
            "training.started",
            "training.completed",
            "training.failed",
            "model.promoted",
            "deployment.updated",
        ),
        writes=(DEADLETTER,),
        build="mlbus.cli.openlineage:run_openlineage",
        metrics=Metrics(port="metrics.openlineage_port"),
        deployment=Deployment(
            "off until configured (MLBUS_OPENLINEAGE__URL or __TRANSPORT): compose profile "
            "`openlineage`, 0 replicas here. Then 1 is plenty (a few events per training run); "
            "more split the partitions of what it reads. Resends are idempotent.",
            cpu="100m",
            memory="256Mi",
        ),
        enabled_by="openlineage.enabled",
    ),
    Service(
        "streams",
        folder="streams/",
        role="faust processors: windowed metrics, drift, alerts, online accuracy from "
        "feedback, Prometheus",
        source="mlbus/streams",
        reads=(
            "inference.logged",
            "inference.feedback",
            "dataset.created",
            "dataset.validated",
            "training.completed",
            "model.promoted",
        ),
        writes=("serving.metrics", "serving.accuracy", "serving.alert", DEADLETTER),
        build="mlbus.cli.streams:run_streams",
        metrics=Metrics(port="streams.metrics_port", own_server=False),
        deployment=Deployment(
            "up to inference.logged's partitions (6); windowed tables are partitioned by model "
            "like the topic."
        ),
        health=HttpCheck(port="streams.metrics_port", path="/metrics"),
    ),
    Service(
        "serve",
        folder="serving/",
        role="model server (Open Inference Protocol v2, HTTP and Kafka)",
        source="mlbus/serving",
        reads=("model.promoted", "model.traffic", "deployment.updated", "inference.requests"),
        writes=(
            "deployment.updated",
            "inference.results",
            "inference.logged",
            "inference.feedback",
            DEADLETTER,
        ),
        build="mlbus.cli.serving:run_serving",
        metrics=Metrics(port="serving.port", own_server=False),
        deployment=Deployment(
            "freely (horizontal pod autoscaler on CPU or request rate): each replica reads "
            "every model.promoted itself, no consumer group.",
            replicas=2,
            max_replicas=8,
            min_available=1,
        ),
        health=HttpCheck(
            port="serving.port",
            path="/v2/health/live",
            ready="/v2/health/ready",
            host="serving.host",
        ),
        # Kafka inference requests and swaps within half a second (HTTP is not waiting on
        # it); at 100 ms its consumers cost the idle broker ~3% of a core.
        fetch_wait_ms=1000,
    ),
    Service(
        "api",
        folder="mlbus/cli/",
        role="the control-plane HTTP API (OpenAPI at /docs, /ui, /metrics)",
        source="mlbus/api",
        reads=(
            "dataset.created",
            "dataset.validated",
            "pipeline.defined",
            "training.requested",
            "training.completed",
            "training.failed",
            "model.promoted",
            "model.rejected",
            "model.traffic",
        ),
        writes=(
            "dataset.created",
            "pipeline.defined",
            "training.requested",
            "model.promoted",
            "model.traffic",
        ),
        build="mlbus.cli.api:run_api",
        metrics=Metrics(port="api.port", own_server=False),
        deployment=Deployment("freely; stateless (reads the log and the metadata store)."),
        health=HttpCheck(port="api.port", path="/health", host="api.host"),
        group=False,
    ),
)


def service(name: str) -> Service:
    """The manifest named `name`; ConfigError naming the services otherwise."""
    for s in SERVICES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown service {name!r}; services: {', '.join(names())}")


def names() -> list[str]:
    return [s.name for s in SERVICES]
