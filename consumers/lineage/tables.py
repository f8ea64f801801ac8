"""The SQL schema of the lineage projection (SQLAlchemy Core tables).

Every projected table is append-only and keyed by the event id that produced its row, with
the row's provenance (topic, partition, offset, event time). Links between entities (a run
and its model version, a version and its promotions) are joins on natural keys at query
time, never foreign keys: the rows of an event that arrives before the one it refers to are
stored as they are and linked as soon as the other side exists, and the set of rows depends
only on the set of events, not on their order. That is what makes incremental projection
and a rebuild from offset 0 produce the same store.
"""

from __future__ import annotations

import sqlalchemy as sa

#: Bump when a table or the meaning of a column changes: a store with another version is
#: dropped and rebuilt from the log, never migrated.
PROJECTION_VERSION = "3"

metadata = sa.MetaData()

# Event time and Kafka timestamps are integer microseconds since the epoch: exact, portable
# between SQLite and PostgreSQL, cheap to index and compare.
Micros = sa.BigInteger


def _provenance() -> list[sa.Column]:
    return [
        sa.Column("event_id", sa.String, primary_key=True),
        sa.Column("topic", sa.String, nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("time", Micros, nullable=False),
    ]


def _table(name: str, *columns: sa.Column | sa.Index) -> sa.Table:
    return sa.Table(name, metadata, *_provenance(), *columns)


events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("type", sa.String, nullable=False),
    sa.Column("topic", sa.String, nullable=False),
    sa.Column("partition", sa.Integer, nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("time", Micros, nullable=False),
    sa.Column("timestamp_ms", sa.BigInteger),
    sa.Column("key", sa.String),
    sa.Column("subject", sa.String),
    sa.Column("source", sa.String),
    sa.Column("correlationid", sa.String),
    sa.Column("causationid", sa.String),
    sa.Column("sha256", sa.String, nullable=False, comment="sha256 of the record value"),
)

dataset_versions = _table(
    "dataset_versions",
    sa.Column("name", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("uri", sa.String, nullable=False),
    sa.Column("content_hash", sa.String, nullable=False),
    sa.Column("num_rows", sa.BigInteger, nullable=False),
    sa.Column("num_bytes", sa.BigInteger, nullable=False),
    sa.Column("label_column", sa.String),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("parents", sa.JSON, nullable=False),
    sa.Column("description", sa.String),
    sa.Column("created_by", sa.String),
    sa.Index("ix_dataset_versions_name", "name", "version", "time", "event_id"),
)

dataset_validations = _table(
    "dataset_validations",
    sa.Column("name", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("content_hash", sa.String, nullable=False),
    sa.Column("validator", sa.String, nullable=False),
    sa.Column("checks", sa.JSON, nullable=False),
)

training_requests = _table(
    "training_requests",
    sa.Column("model", sa.String, nullable=False),
    sa.Column("dataset_name", sa.String, nullable=False),
    sa.Column("dataset_version", sa.String, nullable=False),
    sa.Column("family", sa.String, nullable=False),
    sa.Column("hyperparameters", sa.JSON, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("max_epochs", sa.Integer, nullable=False),
    sa.Column("requested_by", sa.String),
    sa.Column("pipeline", sa.String),
    sa.Column("sweep_id", sa.String),
    sa.Column("correlationid", sa.String),
    # the run the request asks for (`schemas.training.run_id_for`: every worker names it so)
    sa.Column("run_id", sa.String, nullable=False),
    # the rest of the request (early stopping, split, device, sweep point, and fields the
    # contract gains later), so a run shows everything it was asked with
    sa.Column("details", sa.JSON, nullable=False),
    sa.Index("ix_training_requests_dataset", "dataset_name", "dataset_version"),
    sa.Index("ix_training_requests_run", "run_id", "time", "event_id"),
    sa.Index("ix_training_requests_model", "model", "time", "event_id"),
)

training_runs = _table(
    "training_runs",  # training.started: a worker took a request
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("dataset_name", sa.String, nullable=False),
    sa.Column("dataset_version", sa.String, nullable=False),
    sa.Column("worker", sa.String, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("resumed_from_epoch", sa.Integer),
    sa.Index("ix_training_runs_run", "run_id", "time", "event_id"),
    sa.Index("ix_training_runs_request", "request_id"),
    sa.Index("ix_training_runs_dataset", "dataset_name", "dataset_version"),
)

run_progress = _table(
    "run_progress",
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("max_epochs", sa.Integer, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("samples_per_second", sa.Float),
    sa.Index("ix_run_progress_run", "run_id", "epoch", "time", "event_id"),
)

run_failures = _table(
    "run_failures",
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("retryable", sa.Boolean, nullable=False),
    sa.Column("error_type", sa.String),
    sa.Column("epoch", sa.Integer),
    sa.Index("ix_run_failures_run", "run_id", "time", "event_id"),
)

model_versions = _table(
    "model_versions",  # training.completed: the version a run produced
    sa.Column("model", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("family", sa.String, nullable=False),
    sa.Column("dataset_name", sa.String, nullable=False),
    sa.Column("dataset_version", sa.String, nullable=False),
    sa.Column("artifact_uri", sa.String, nullable=False),
    sa.Column("artifact_sha256", sa.String, nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("hyperparameters", sa.JSON, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("epochs", sa.Integer, nullable=False),
    sa.Column("code_version", sa.String, nullable=False),
    sa.Column("git_commit", sa.String),
    sa.Column("duration_seconds", sa.Float, nullable=False),
    # the rest of the completion: confusion matrix and labels, the artifact's format, size
    # and model card, device, torch version, peak memory, and fields the contract gains later
    sa.Column("details", sa.JSON, nullable=False),
    sa.Index("ix_model_versions_run", "run_id", "time", "event_id"),
    sa.Index("ix_model_versions_version", "model", "version", "time", "event_id"),
    sa.Index("ix_model_versions_newest", "model", "time", "event_id"),
    sa.Index("ix_model_versions_dataset", "dataset_name", "dataset_version"),
)

decisions = _table(
    "decisions",  # model.promoted (kind promoted, rollbacks too) and model.rejected
    sa.Column("kind", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("run_id", sa.String),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("actor", sa.String, nullable=False),
    sa.Column("policy_name", sa.String),
    sa.Column("policy_version", sa.Integer),
    sa.Column("evidence", sa.JSON, nullable=False),
    sa.Column("rollback", sa.Boolean, nullable=False),
    sa.Column("previous_version", sa.String),
    sa.Column("champion_version", sa.String),
    sa.Column("cause", sa.String),
    sa.Index("ix_decisions_version", "model", "version", "time", "offset"),
    # "which version served at T": the newest promotion of a model, read off this index
    sa.Index("ix_decisions_timeline", "model", "kind", "time", "offset", "event_id"),
)

deployments = _table(
    "deployments",
    sa.Column("model", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("replica", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("artifact_sha256", sa.String),
    sa.Column("error", sa.String),
    sa.Index("ix_deployments_model", "model", "replica", "time", "offset"),
    sa.Index("ix_deployments_version", "model", "version", "time", "offset"),
)

pipelines = _table(
    "pipelines",
    sa.Column("name", sa.String, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("dataset", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("family", sa.String, nullable=False),
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("actor", sa.String, nullable=False),
)

alerts = _table(
    "alerts",
    sa.Column("model", sa.String, nullable=False),
    sa.Column("version", sa.String, nullable=False),
    sa.Column("alert", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("metric", sa.String, nullable=False),
    sa.Column("value", sa.Float, nullable=False),
    sa.Column("threshold", sa.Float, nullable=False),
)

rollouts = _table(
    "rollouts",  # model.traffic: one row per change of a model's split (started, advanced,
    # completed, aborted), with the weights then in force and the analysis that caused it
    sa.Column("rollout_id", sa.String, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("strategy", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("stable", sa.String, nullable=False),
    sa.Column("candidate", sa.String, nullable=False),
    sa.Column("weights", sa.JSON, nullable=False),
    sa.Column("shadow", sa.Boolean, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("steps", sa.JSON, nullable=False),
    sa.Column("criteria", sa.JSON, nullable=False),
    sa.Column("analysis", sa.JSON, nullable=False),
    sa.Column("reason", sa.String, nullable=False),
    sa.Column("actor", sa.String, nullable=False),
    sa.Column("policy_name", sa.String),
    sa.Column("policy_version", sa.Integer),
    sa.Column("run_id", sa.String),
    sa.Column("cause", sa.String),
    # "which split was in force at T": the newest traffic event of a model, off this index
    sa.Index("ix_rollouts_model", "model", "time", "offset", "event_id"),
    sa.Index("ix_rollouts_rollout", "rollout_id", "time", "offset"),
)

#: dataset version → dataset version (derived_from), dataset version → run (trained_on),
#: run → model version (produced), model version → replica (deployed). Nodes are
#: "kind:name@version" strings; the edge exists as soon as one event states it.
lineage_edges = _table(
    "lineage_edges",
    sa.Column("relation", sa.String, primary_key=True),
    sa.Column("src", sa.String, primary_key=True),
    sa.Column("dst", sa.String, primary_key=True),
    sa.Index("ix_lineage_edges_src", "src"),
)

#: Records that did not decode: counted once each (keyed by position), never fatal.
skipped = sa.Table(
    "skipped",
    metadata,
    sa.Column("topic", sa.String, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("offset", sa.BigInteger, primary_key=True),
    sa.Column("reason", sa.String, nullable=False),
)

#: The projector's position per topic-partition: written in the same transaction as the rows,
#: with the anchor of the log it belongs to (mlbus/kafka/anchor.py: the offset and digest of
#: the last record projected). The anchor columns came after the table: `ANCHOR_COLUMNS` are
#: added to a store made without them (`LineageStore.ensure`), whose rows keep NULL anchors
#: until their next write.
positions = sa.Table(
    "positions",
    metadata,
    sa.Column("topic", sa.String, primary_key=True),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("anchor_offset", sa.BigInteger),
    sa.Column("anchor_digest", sa.String),
)
ANCHOR_COLUMNS = ("anchor_offset", "anchor_digest")

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

# Indexes end in (time, event_id or offset): every lookup by natural key reads the first (or
# last) matching row off the index instead of sorting the matches. Only what a query uses is
# indexed: each index costs the projection's inserts.

#: Tables whose rows are the projection (what `dump` prints), by the event type feeding them.
PROJECTED = (
    events,
    dataset_versions,
    dataset_validations,
    training_requests,
    training_runs,
    run_progress,
    run_failures,
    model_versions,
    decisions,
    deployments,
    pipelines,
    alerts,
    rollouts,
    lineage_edges,
    skipped,
)
