"""Time travel against a hand-built history: two datasets (B derived from A), three runs,
two promotions, a rejection and a rollback. Every answer is checked by hand, on both
backends, with the events projected in a shuffled order."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.store import LineageStore, NotInLineage
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.datasets import DatasetCreated
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted, ModelRejected
from mlbus.schemas.training import TrainingCompleted, TrainingRequested, TrainingStarted

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHA = "sha256:" + "ab" * 32


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def _dataset(name: str, parents: list[dict[str, str]]) -> DatasetCreated:
    return DatasetCreated.model_validate(
        {
            "name": name,
            "version": "v1",
            "uri": f"s3://b/{name}",
            "content_hash": SHA,
            "arrow_schema": [{"name": "x", "type": "double"}],
            "num_rows": 10,
            "num_bytes": 100,
            "parents": parents,
            "created_by": "etl",
        }
    )


def _run(n: int, dataset: str, t: float) -> list[tuple[float, Payload, str | None]]:
    ds = {"name": dataset, "version": "v1"}
    return [
        (
            t,
            TrainingRequested.model_validate(
                {
                    "model": "m",
                    "dataset": ds,
                    "family": "mlp",
                    "hyperparameters": {"lr": n / 10},
                    "requested_by": "alice",
                }
            ),
            f"req-{n}",
        ),
        (
            t + 0.5,
            TrainingStarted.model_validate(
                {
                    "run_id": f"r{n}",
                    "model": "m",
                    "request_id": f"req-{n}",
                    "dataset": ds,
                    "worker": "w1",
                }
            ),
            None,
        ),
        (
            t + 1,
            TrainingCompleted.model_validate(
                {
                    "run_id": f"r{n}",
                    "model": "m",
                    "version": str(n),
                    "request_id": f"req-{n}",
                    "family": "mlp",
                    "dataset": ds,
                    "artifact": {"uri": f"file:///m{n}", "sha256": SHA},
                    "metrics": {"test": {"accuracy": 0.8 + n / 100}},
                    "hyperparameters": {"lr": n / 10},
                    "epochs": 3,
                    "code": {"package_version": "0.1.0", "git_commit": f"c{n}"},
                    "duration_seconds": 1.0,
                }
            ),
            None,
        ),
    ]


def _loaded(version: str, t: float) -> tuple[float, Payload, None]:
    return (t, DeploymentUpdated(model="m", version=version, replica="r1", status="loaded"), None)


HISTORY: list[tuple[float, Payload, str | None]] = [
    (1, _dataset("A", []), None),
    (2, _dataset("B", [{"name": "A", "version": "v1"}]), None),
    *_run(1, "A", 3),  # 3, 3.5, 4
    (6, ModelPromoted.model_validate({
        "model": "m", "version": "1", "run_id": "r1", "reason": "first", "actor": "workflow",
        "policy": {"name": "p", "version": 1}, "evidence": {"test.accuracy": 0.81}}), None),
    _loaded("1", 6.5),
    *_run(2, "B", 7),  # 7, 7.5, 8
    (10, ModelPromoted.model_validate({
        "model": "m", "version": "2", "run_id": "r2", "previous_version": "1",
        "reason": "better", "actor": "workflow", "policy": {"name": "p", "version": 1},
        "evidence": {"test.accuracy": 0.82, "champion": 0.81}}), None),
    _loaded("2", 10.5),
    *_run(3, "B", 11),  # 11, 11.5, 12
    (14, ModelRejected.model_validate({
        "model": "m", "version": "3", "run_id": "r3", "reason": "not better by the margin",
        "actor": "workflow", "policy": {"name": "p", "version": 2}, "champion_version": "2",
        "evidence": {"test.accuracy": 0.83, "margin": 0.05}}), None),
    (16, ModelPromoted.model_validate({
        "model": "m", "version": "1", "previous_version": "2", "reason": "rollback: error_rate",
        "actor": "workflow", "rollback": True, "policy": {"name": "p", "version": 2}}), None),
    _loaded("1", 16.5),
]  # fmt: skip


@pytest.fixture
def queries(store: LineageStore) -> LineageQueries:
    records: list[LogRecord] = []
    for i, (minute, payload, event_id) in enumerate(HISTORY):
        ref, value = encode_new(payload, source="test", time=at(minute), event_id=event_id)
        records.append(
            LogRecord(
                ref.type, 0, i, None, (ref.key or "").encode(), tuple(STRUCTURED_HEADERS), value
            )
        )
    random.Random(1).shuffle(records)  # arrival order does not matter
    Projector(store).project(records, batch_size=4)
    return LineageQueries(store)


def test_which_version_served_when(queries: LineageQueries) -> None:
    # Serving is what a replica loaded (deployment.updated), not the last promotion.
    assert queries.serving("m", at(5)) is None
    assert queries.serving("m", at(6)) is None  # promoted, not loaded yet
    assert queries.serving("m", at(6.5)) == "1"
    assert queries.serving("m", at(10)) == "1"  # 2 promoted, 1 still serves
    assert queries.serving("m", at(10.5)) == "2"
    assert queries.serving("m", at(15)) == "2"  # the rejection of 3 changes nothing
    assert queries.serving("m", at(16)) == "2"  # rolled back, not reloaded yet
    assert queries.serving("m", at(16.5)) == "1"
    assert queries.serving("m") == "1"
    assert queries.replicas("m") == {"r1": "1"}
    kinds = [(d.kind, d.version, d.rollback) for d in queries.history("m")]
    assert kinds == [
        ("promoted", "1", False),
        ("promoted", "2", False),
        ("rejected", "3", False),
        ("promoted", "1", True),
    ]
    assert len(queries.history("m", at(12))) == 2


def test_upstream_as_known_at_a_time(queries: LineageQueries) -> None:
    up = queries.upstream("m", as_of=at(12))
    assert (up.version, up.serving, up.run.run_id) == ("2", True, "r2")
    assert up.run.hyperparameters == {"lr": 0.2} and up.run.git_commit == "c2"
    assert up.run.requested_by == "alice" and up.run.status == "completed"
    [b] = up.datasets
    assert (b.name, b.known, [(p.name, p.known) for p in b.parents]) == ("B", True, [("A", True)])
    assert [d.kind for d in up.decisions] == ["promoted"]
    assert [(d.replica, d.version) for d in up.deployments] == [("r1", "2")]

    earlier = queries.upstream("m", as_of=at(8.5))
    assert (earlier.version, earlier.run.run_id) == ("1", "r1")
    assert [d.name for d in earlier.datasets] == ["A"]

    # at minute 11.7, run 3 had started but produced nothing yet
    with pytest.raises(NotInLineage):
        queries.upstream("m", "3", as_of=at(11.7))
    with pytest.raises(NotInLineage):
        queries.upstream("m", as_of=at(2))

    now = queries.upstream("m")
    assert (now.version, now.serving) == ("1", True)
    assert [d.kind for d in now.decisions] == ["promoted", "promoted"]
    assert now.decisions[1].rollback and now.decisions[1].policy == "p v2"

    # version 2 as of now: it trained on B, no longer serves
    two = queries.upstream("m", "2")
    assert not two.serving and two.datasets[0].name == "B"


def test_why(queries: LineageQueries) -> None:
    [rejected] = queries.why("m", "3").decisions
    assert (rejected.kind, rejected.champion_version, rejected.policy) == ("rejected", "2", "p v2")
    assert rejected.evidence == {"test.accuracy": 0.83, "margin": 0.05}
    promoted = queries.why("m", "2").decisions
    assert [(d.kind, d.previous_version) for d in promoted] == [("promoted", "1")]
    assert promoted[0].evidence == {"test.accuracy": 0.82, "champion": 0.81}


def test_downstream_now_and_then(queries: LineageQueries) -> None:
    [a] = queries.downstream("A").versions
    assert a.derived == ["dataset:B@v1"]
    [use] = a.uses
    assert (use.model, use.version, use.serving_now, use.replicas) == ("m", "1", True, ["r1"])

    [b] = queries.downstream("B", "v1").versions
    summary = [(u.run_id, u.version, u.serving_now, u.replicas, u.decisions) for u in b.uses]
    assert summary == [("r2", "2", False, [], ["promoted"]), ("r3", "3", False, [], ["rejected"])]

    [b_then] = queries.downstream("B", as_of=at(13)).versions
    summary = [(u.run_id, u.version, u.serving_now, u.replicas) for u in b_then.uses]
    assert summary == [("r2", "2", True, ["r1"]), ("r3", "3", False, [])]


def test_graphs_show_the_lineage(queries: LineageQueries) -> None:
    from mlbus.consumers.lineage.graph import downstream_graph, to_dot, to_mermaid, upstream_graph

    dot = to_dot(upstream_graph(queries.upstream("m", "2")))
    assert '"dataset:A@v1" -> "dataset:B@v1"' in dot and '"run:r2" -> "model:m@2"' in dot
    mermaid = to_mermaid(downstream_graph(queries.downstream("A")))
    assert mermaid.startswith("flowchart LR") and "-->|produced|" in mermaid
