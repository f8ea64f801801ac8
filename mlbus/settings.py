"""All configuration of mlbus in one pydantic-settings object (env prefix `MLBUS_`).

Only entry points (the CLI, app composition) read the environment; components receive a
`Settings` (or the part of it they need) as an argument.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from mlbus.errors import ConfigError

_HOSTPORT = re.compile(r"^\[?[A-Za-z0-9.\-:_]+\]?:\d{1,5}$")
_SECRET = re.compile(r"password|secret|token|key$|\.pem$|jaas|credential", re.IGNORECASE)


def is_secret(key: str) -> bool:
    """Whether the librdkafka setting `key` holds a secret (kept as a `SecretStr`, masked in
    every repr and display)."""
    return bool(_SECRET.search(key))


def reveal(value: str | SecretStr) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class _Section(BaseModel):
    model_config = {"frozen": True, "extra": "forbid"}


class ApiSettings(_Section):
    """The control-plane HTTP API (`mlbus api`)."""

    host: str = Field(default="127.0.0.1", description="interface the API listens on")
    port: int = Field(default=8000, ge=0, lt=65536, description="the API's port")
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="larger request bodies get 413, refused before they are read",
    )
    max_upload_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1024,
        description="larger multipart uploads (POST /datasets, streamed to disk) get 413",
    )


class ServingSettings(_Section):
    """The model server (`mlbus serve`); env `MLBUS_SERVING__<FIELD>`."""

    host: str = Field(default="127.0.0.1", description="interface the model server listens on")
    port: int = Field(default=8080, ge=0, lt=65536, description="the model server's port")
    replica: str = Field(default="", description="replica id; empty = hostname:pid")
    max_batch_size: int = Field(
        default=64, ge=1, description="micro-batching: most samples per forward pass"
    )
    max_wait_us: int = Field(default=2000, ge=0, description="micro-batching wait, microseconds")
    log_sample_rate: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of predictions logged to inference.logged"
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="larger request bodies get 413"
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="intra-op threads of a heavy model's forward passes; 0 = the usable cores",
    )
    load_attempts: int = Field(
        default=5,
        ge=1,
        description="tries to load a promoted version while the object store is unreachable; "
        "after the last one the version is failed",
    )
    load_retry_seconds: float = Field(
        default=0.5, gt=0, description="wait before the second try; doubles each time, up to 30 s"
    )
    max_rows_per_request: int = Field(
        default=100_000,
        ge=1,
        description="a request with more input rows gets 413; larger ones than max_batch_size "
        "run in chunks, taking turns with other requests",
    )
    log_buffer_records: int = Field(
        default=10_000,
        ge=1,
        description="inference-log records held while the broker is away (in the log's queue "
        "and in its producer each); more are dropped and counted",
    )
    max_request_id_bytes: int = Field(
        default=256,
        ge=16,
        le=4096,
        description="a longer client-chosen request id is refused (400; a stream request is "
        "dead-lettered)",
    )
    reply_topic_prefix: str = Field(
        default="inference.results.",
        min_length=1,
        description="stream inference replies to inference.results or to an existing topic "
        "whose name starts with this (after the topic prefix); it never creates one",
    )


class StreamsSettings(_Section):
    """The stream processors (`mlbus streams`); env `MLBUS_STREAMS__<FIELD>`."""

    metrics_port: int = Field(default=9108, ge=0, lt=65536, description="Prometheus; 0 = off")
    web_port: int = Field(default=0, ge=0, lt=65536, description="faust's web server; 0 = off")
    window_seconds: float = Field(default=10.0, gt=0, description="tumbling window size")
    hopping_seconds: float = Field(default=60.0, gt=0, description="the hopping view's size")
    grace_seconds: float = Field(
        default=5.0, ge=0, description="how late (event time) a record may still count"
    )
    alert_windows: int = Field(default=3, ge=1, description="consecutive breached windows")
    max_error_rate: float = Field(default=0.05, ge=0, le=1, description="alert threshold")
    max_latency_p99_seconds: float = Field(default=0.5, gt=0, description="alert threshold")
    max_psi: float = Field(
        default=0.2,
        gt=0,
        description="alert threshold (input drift), raised to the PSI that sampling noise "
        "alone gives at the window's sample size (streams.psi_noise_quantile); drift only alerts",
    )
    min_samples: int = Field(
        default=100,
        ge=1,
        description="a window with fewer samples (requests not refused for their input; "
        "labelled feedback) is not judged by any alert rule",
    )
    confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description="one-sided confidence of the rules' intervals: an error ratio breaches when "
        "the lower bound of its Wilson interval is above the threshold; also the level a "
        "rollback's comparison with the previous version must reach",
    )
    psi_noise_quantile: float = Field(
        default=0.99,
        gt=0.5,
        lt=1,
        description="the quantile of the worst feature's PSI, over draws of the window's size "
        "from the training baseline, below which drift is noise",
    )
    history_windows: int = Field(
        default=60,
        ge=1,
        description="closed windows kept per version as the evidence a rollback compares with",
    )
    min_accuracy: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="alert threshold: online accuracy from feedback (inference.feedback); "
        "breached when the upper bound of its Wilson interval is below it",
    )
    max_rmse: float | None = Field(
        default=None, gt=0, description="alert threshold on online RMSE from feedback; None = off"
    )
    feedback: bool = Field(
        default=True,
        description="join inference.feedback with inference.logged into serving.accuracy "
        "(reads the inference log a second time, from its beginning at each start)",
    )
    feedback_horizon_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="feedback known later than this after its prediction is counted late, "
        "not joined; predictions older than this (event time) are forgotten",
    )
    feedback_max_pending: int = Field(
        default=200_000,
        ge=1,
        description="logged predictions held for the feedback join; the oldest beyond it are "
        "forgotten (their feedback then counts as unmatched)",
    )


class ArchiveSettings(_Section):
    """The archiver (`mlbus archive run`); env `MLBUS_ARCHIVE__<FIELD>`."""

    flush_bytes: int = Field(default=64 * 1024 * 1024, ge=1, description="file size that flushes")
    flush_seconds: float = Field(default=60.0, gt=0, description="age that flushes a file")


class PositionsSettings(_Section):
    """Stores of positions (the lineage store, the archive, the stream processors' table);
    env `MLBUS_POSITIONS__<FIELD>`."""

    on_new_log: Literal["fail", "rebuild", "restart"] = Field(
        default="fail",
        description="when a partition's log is not the one a store's positions belong to "
        "(topic recreated, broker restarted empty): fail = stop and say so; rebuild = rebuild "
        "the store from the new log (the archive sets the old log's files aside); restart = "
        "keep what the store holds and continue from the new log's offset 0",
    )


class JournalSettings(_Section):
    """The embedded broker's journal (`<data_dir>/journal`); env `MLBUS_JOURNAL__<FIELD>`."""

    enabled: bool = Field(
        default=True,
        description="keep the embedded broker's log and group offsets across restarts",
    )
    sync_ms: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="longest wait before journaled records are synced to disk",
    )
    fetch_wait_ms: int = Field(
        default=1000,
        ge=1,
        le=1000,
        description="longest wait of the journal's fetches: a record waits at most half of it "
        "(the broker looks for records halfway through a wait), which with the sync interval "
        "is the loss bound of a crash; each look names every partition, so a shorter wait "
        "costs the embedded broker more (~2% of a core at 500 ms, ~1% at 1 s)",
    )
    watch_ms: int = Field(
        default=400,
        ge=0,
        le=1000,
        description="once every partition is read to its end and a fetch wait brought nothing, "
        "the capture stops fetching and asks for the partitions' ends this often (one request, "
        "~50 times cheaper for the broker than a fetch that waits), fetching again when one "
        "moves: the loss bound while idle; 0 = always fetch",
    )
    snapshot_seconds: float = Field(
        default=1.0, gt=0, description="interval of the consumer-group offset snapshots"
    )
    rotate_mb: int = Field(
        default=512,
        ge=16,
        description="the embedded broker's resident memory (MB) past which `mlbus up` rotates "
        "it (a new broker restored from the journal without what retention expired), once it "
        "is also twice what it held after its last restore",
    )
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU niceness of the journal's capture thread: on a busy machine it "
        "lags producers during a burst instead of slowing them",
    )


class TrainerSettings(_Section):
    """The training workers (`mlbus trainer`); env `MLBUS_TRAINER__<FIELD>`."""

    validation_wait_seconds: float = Field(
        default=120.0,
        ge=0,
        description="a request for a dataset version announced but not yet validated waits "
        "this long after the announcement for the validator's verdict, then fails",
    )
    transactions: bool | None = Field(
        default=None,
        description="publish a run's outcome and commit its request's offset in one Kafka "
        "transaction; empty = on against a configured cluster, off on the embedded broker "
        "(which never ends a dead worker's transaction)",
    )
    rendezvous_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="a `workers: N` run waits this long for its members to join, then fails "
        "(or, restarting after a lost member, goes on with those that came)",
    )
    collective_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="a data-parallel collective or rendezvous connection with a member "
        "gone fails after this; the run then restarts from its last checkpoint",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="intra-op threads of each training run (and of each data-parallel "
        "member); 0 = torch's default, the usable cores. Several trainer workers on one "
        "machine each take their share of the cores",
    )
    advertise_address: str = Field(
        default="127.0.0.1",
        description="the address other trainer workers dial to join a run this worker hosts",
    )


class WorkflowSettings(_Section):
    """The workflow manager (`mlbus workflow`); env `MLBUS_WORKFLOW__<FIELD>`."""

    sweep_deadline_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="a sweep's runs still missing this long after it was requested are "
        "declared failed (a pipeline's `deadline_seconds` overrides it)",
    )
    rollout_min_samples: int = Field(
        default=200,
        ge=1,
        description="a canary step is decided once the candidate served this many requests "
        "in it (a rollout's `min_samples` overrides it)",
    )
    rollout_confidence: float = Field(
        default=0.99,
        gt=0.5,
        lt=1.0,
        description="confidence of a canary step's tests (candidate worse on error ratio or "
        "accuracy than the stable version)",
    )
    rollout_max_error_ratio: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="a canary step aborts when the lower bound of the candidate's server-error "
        "ratio is above this",
    )
    rollout_max_latency_ratio: float = Field(
        default=1.5,
        gt=0.0,
        description="a canary step aborts when the candidate's latency p99 is above this "
        "multiple of the stable version's",
    )
    rollout_min_labelled: int = Field(
        default=50,
        ge=1,
        description="labelled feedback each version needs in a step before accuracy is compared",
    )


class LimitsSettings(_Section):
    """Limits on what users submit, checked before it is expanded; env
    `MLBUS_LIMITS__<FIELD>`."""

    max_pipeline_bytes: int = Field(
        default=64 * 1024, ge=1024, description="larger pipeline YAML files are refused"
    )
    max_sweep_runs: int = Field(
        default=1000, ge=1, description="a sweep whose grid has more points is refused"
    )
    max_archive_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="an .npz whose members declare more uncompressed bytes is refused unread",
    )
    max_row_group_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=1024,
        description="a Parquet file with a row group of more uncompressed bytes (as its footer "
        "declares) is refused unread, when registered or validated",
    )


class MetricsSettings(_Section):
    """Prometheus metrics (`/metrics`) of the services; env `MLBUS_METRICS__<FIELD>`. The
    services without an HTTP server of their own (validator, trainer, workflow, lineage,
    archive, openlineage) get a small one from `mlbus run` on these ports; 0 turns one off."""

    host: str = Field(
        default="127.0.0.1", description="interface the metrics servers of `mlbus run` listen on"
    )
    validator_port: int = Field(default=9201, ge=0, lt=65536, description="validator; 0 = off")
    trainer_port: int = Field(default=9202, ge=0, lt=65536, description="trainer; 0 = off")
    workflow_port: int = Field(default=9203, ge=0, lt=65536, description="workflow; 0 = off")
    lineage_port: int = Field(default=9204, ge=0, lt=65536, description="lineage; 0 = off")
    archive_port: int = Field(default=9205, ge=0, lt=65536, description="archive; 0 = off")
    openlineage_port: int = Field(default=9206, ge=0, lt=65536, description="openlineage; 0 = off")
    tuning_port: int = Field(default=9207, ge=0, lt=65536, description="tuning; 0 = off")
    lag_interval_ms: int = Field(
        default=5000,
        ge=0,
        description="how often consumers report their lag (librdkafka statistics.interval.ms); "
        "0 = no mlbus_consumer_lag",
    )


class OpenLineageSettings(_Section):
    """The OpenLineage emitter (`mlbus run openlineage`); env `MLBUS_OPENLINEAGE__<FIELD>`.
    Off unless a URL or a transport is set."""

    url: str = Field(
        default="", description="Marquez-compatible server (http://marquez:5000); sets HTTP"
    )
    transport: Literal["", "http", "kafka", "console"] = Field(
        default="", description="empty = http when `url` is set, else off"
    )
    endpoint: str = Field(default="api/v1/lineage", description="HTTP path of the lineage API")
    api_key: SecretStr | None = Field(default=None, description="HTTP bearer token, if any")
    timeout: float = Field(default=5.0, gt=0, description="HTTP timeout, seconds")
    topic: str = Field(
        default="openlineage.events", description="Kafka transport's topic (topic prefix added)"
    )
    namespace: str = Field(
        default="mlbus", min_length=1, description="OpenLineage namespace of the jobs and datasets"
    )
    producer: str = Field(
        default="urn:mlbus:openlineage",
        min_length=1,
        description="URI naming the producer in every event",
    )

    @property
    def kind(self) -> str:
        """The transport in force: http, kafka, console, or "" (off)."""
        return self.transport or ("http" if self.url else "")

    @property
    def enabled(self) -> bool:
        return bool(self.kind)

    @model_validator(mode="after")
    def _http_needs_url(self) -> OpenLineageSettings:
        if self.kind == "http" and not self.url:
            raise ValueError("openlineage.transport http needs openlineage.url")
        return self


class Settings(BaseSettings):
    """mlbus settings. Every field can be set as `MLBUS_<FIELD>`; extra librdkafka settings
    as `MLBUS_KAFKA__SECURITY_PROTOCOL=SASL_SSL` (becomes `security.protocol`) or as JSON in
    `MLBUS_KAFKA='{"sasl.mechanism": "PLAIN"}'`."""

    model_config = SettingsConfigDict(
        env_prefix="MLBUS_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    data_dir: Path = Field(default=Path(".mlbus"), description="local state: broker, db, objects")
    kafka_bootstrap_servers: str = Field(
        default="", description="host:port[,host:port…] of a Kafka cluster; empty = embedded"
    )
    kafka: dict[str, str | SecretStr] = Field(
        default_factory=dict,
        description="extra librdkafka settings, passed through: MLBUS_KAFKA__SASL_MECHANISM=PLAIN "
        "becomes sasl.mechanism (or JSON); secrets (passwords, keys, JAAS) are kept masked",
    )
    topic_prefix: str = Field(
        default="", description="prepended to every topic name (several stacks on one cluster)"
    )
    metadata_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite in data_dir")
    object_store_url: str = Field(
        default="", description="file:// folder or s3://bucket/prefix; empty = data_dir/objects"
    )
    s3_endpoint_url: str = Field(default="", description="S3 API endpoint (MinIO, moto)")
    allowed_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="local folders and URI prefixes datasets may be read from, besides the "
        "object store (comma-separated or JSON); empty = the working directory and data_dir",
    )
    max_event_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="larger records are dead-lettered unread"
    )
    verify: Literal["cached", "full"] = Field(
        default="cached",
        description="dataset reads: 'cached' hashes an object fully the first time and trusts "
        "its unchanged identity (inode, size, times; S3 ETag) afterwards, recorded in "
        "data_dir/verified; 'full' hashes every byte of every read (CLI: --verify full)",
    )
    api_token: SecretStr | None = Field(
        default=None, description="bearer token for mutating/control HTTP endpoints; None = open"
    )
    api: ApiSettings = ApiSettings()
    serving: ServingSettings = ServingSettings()
    streams: StreamsSettings = StreamsSettings()
    archive: ArchiveSettings = ArchiveSettings()
    positions: PositionsSettings = PositionsSettings()
    limits: LimitsSettings = LimitsSettings()
    journal: JournalSettings = JournalSettings()
    trainer: TrainerSettings = TrainerSettings()
    workflow: WorkflowSettings = WorkflowSettings()
    openlineage: OpenLineageSettings = OpenLineageSettings()
    metrics: MetricsSettings = MetricsSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR"
    )

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        value = value.strip()
        for server in filter(None, (s.strip() for s in value.split(","))):
            host = server.split("://", 1)[-1]
            if not _HOSTPORT.match(host) or not 0 < int(host.rsplit(":", 1)[1]) < 65536:
                raise ValueError(f"{server!r} is not host:port")
        return value

    @field_validator("kafka", mode="before")
    @classmethod
    def _librdkafka_keys(cls, value: Any) -> Any:
        # MLBUS_KAFKA__SASL_MECHANISM arrives as {"sasl_mechanism": ...}: librdkafka's names
        # use dots, never underscores.
        if isinstance(value, dict):
            out: dict[str, str | SecretStr] = {}
            for k, v in value.items():
                key = str(k).lower().replace("_", ".")
                text = reveal(v) if isinstance(v, SecretStr) else str(v)
                out[key] = SecretStr(text) if is_secret(key) else text
            return out
        return value

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                import json

                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError("not valid JSON") from None
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not re.match(r"^[A-Za-z0-9._-]+$", value):
            raise ValueError("may contain only letters, digits, '.', '_' and '-'")
        return value

    @field_validator("object_store_url")
    @classmethod
    def _store(cls, value: str) -> str:
        if value and not re.match(r"^(file|s3|memory)://", value):
            raise ValueError(f"{value!r} must start with file://, s3:// or memory://")
        return value

    @field_validator("metadata_url")
    @classmethod
    def _db(cls, value: str) -> str:
        if not value:
            return value
        try:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError
        except ModuleNotFoundError:  # a bare install: only the lineage store (platform) uses it
            return value
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"{value!r} is not a database URL") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:// and postgresql:// are supported")
        if url.drivername == "postgresql":  # the driver mlbus ships with
            value = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        data_dir = self.data_dir.expanduser()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.metadata_url:
            object.__setattr__(self, "metadata_url", f"sqlite:///{data_dir.resolve()}/metadata.db")
        if not self.allowed_roots:
            roots = [str(Path.cwd()), str(data_dir.resolve())]
            object.__setattr__(self, "allowed_roots", roots)
        if not self.object_store_url:
            object.__setattr__(self, "object_store_url", (data_dir.resolve() / "objects").as_uri())
        return self

    @property
    def embedded(self) -> bool:
        """True when no cluster is configured and the embedded broker is used."""
        return not self.kafka_bootstrap_servers

    def __repr_args__(self) -> Any:
        # The metadata URL is a plain string (SQLAlchemy needs it whole), so its password is
        # masked here: a repr ends up in logs and tracebacks.
        for name, value in super().__repr_args__():
            yield name, (_hide_password(value) if name == "metadata_url" else value)

    def redacted(self) -> dict[str, Any]:
        """The settings for display, with secrets masked."""
        out = self.model_dump(mode="json")
        out["kafka"] = {k: ("***" if is_secret(k) else reveal(v)) for k, v in self.kafka.items()}
        out["metadata_url"] = _hide_password(self.metadata_url)
        return out


def _hide_password(url: str) -> str:
    """`url` with the password of its authority shown as *** (as SQLAlchemy renders it; done
    here so that `mlbus settings` works without SQLAlchemy)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; a wrong one raises `ConfigError` with one line."""
    try:
        return Settings(**overrides)
    except SettingsError as e:  # a value pydantic-settings could not parse (bad JSON)
        field = re.search(r'field "(\w+)"', str(e))
        env = "MLBUS_" + (field.group(1).upper() if field else "?")
        raise ConfigError(f"invalid setting {env}: not valid JSON") from None
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        env = "MLBUS_" + "__".join(str(p) for p in first["loc"][:2]).upper()
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {env}: {message}{more}") from None
