"""The control plane's listings as queries of the store, on both backends: every model with
its versions, their status (champion, rolled back, promoted before, rejected, candidate)
and its champion; the newest events; the versions a typed prefix is resolved against."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.models import ModelPromoted, ModelRejected
from tests.consumers.workflow.support import completed

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def promoted(
    version: str, previous: str | None, *, actor: str = "mlbus/workflow", rollback: bool = False
) -> ModelPromoted:
    return ModelPromoted(
        model="m1",
        version=version,
        previous_version=previous,
        actor=actor,
        reason="rollback" if rollback else "better",
        rollback=rollback,
        policy={"name": "accuracy", "version": 2},
    )


HISTORY: list[Payload] = [
    completed("m1", "a", 0.95), completed("m1", "b", 0.97), completed("m1", "c", 0.99),
    completed("m1", "d", 0.90), completed("m1", "e", 0.96), completed("other", "x1", 0.5),
    promoted("a", None), promoted("b", "a", actor="user:ann"), promoted("c", "b"),
    ModelRejected(model="m1", version="d", reason="does not beat c", actor="mlbus/workflow",
                  champion_version="c"),
    promoted("b", "c", actor="user:bob", rollback=True),
]  # fmt: skip


def project(store: LineageStore) -> list[str]:
    ids = []
    records = []
    for i, payload in enumerate(HISTORY):
        ref, value = encode_new(payload, source="test", time=T0 + timedelta(minutes=i))
        ids.append(ref.id)
        records.append(
            LogRecord(
                ref.type, 0, i, None, (ref.key or "").encode(), tuple(STRUCTURED_HEADERS), value
            )
        )
    Projector(store).project(records)
    return ids


def test_models_with_their_versions_status_and_champion(store: LineageStore) -> None:
    ids = project(store)
    m1, other = LineageQueries(store).models()
    assert (m1.model, other.model) == ("m1", "other")
    assert {v.version: v.status for v in m1.versions} == {
        "a": "promoted before",
        "b": "champion",
        "c": "rolled back",
        "d": "rejected",
        "e": "candidate",
    }
    champion = m1.champion
    assert champion is not None and (champion.version, champion.actor) == ("b", "user:bob")
    assert champion.rollback and champion.event_id == ids[-1]
    assert champion.policy == {"name": "accuracy", "version": 2}
    assert champion.since == (T0 + timedelta(minutes=len(HISTORY) - 1)).strftime(
        "%Y-%m-%dT%H:%M:%S.000000Z"
    )
    d = next(v for v in m1.versions if v.version == "d")
    assert d.rejected == "does not beat c" and d.run_id == "run-d"
    assert d.dataset == {"name": "iris", "version": "v1"}
    assert d.metrics["test.accuracy"] == 0.90 and "inference.latency_p95_ms" in d.metrics
    assert other.champion is None and [v.status for v in other.versions] == ["candidate"]


def test_as_of_a_time_the_listing_is_what_was_known_then(store: LineageStore) -> None:
    project(store)
    before_rollback = T0 + timedelta(minutes=len(HISTORY) - 2)
    m1, _ = LineageQueries(store).models(before_rollback)
    assert m1.champion is not None and m1.champion.version == "c"


def test_recent_events_newest_first_and_versions_to_resolve_against(
    store: LineageStore,
) -> None:
    ids = project(store)
    queries = LineageQueries(store)
    recent = queries.recent(["model.promoted", "model.rejected"], 2)
    assert [(e.id, e.type) for e in recent] == [
        (ids[-1], "model.promoted"),
        (ids[-2], "model.rejected"),
    ]
    assert queries.model_versions("m1") == ["a", "b", "c", "d", "e"]
    assert queries.model_versions("ghost") == []
    assert queries.dataset_versions("iris") == ["v1"]
