"""Rollouts in the lineage store: `model.traffic` events are projected (each change of the
split with its weights, actor, reason and analysis), the split in force is answered at any
time, and the audit of a request id names the version that answered it, its part of the
split then (stable, a canary's candidate, a shadow), the rollout with the weights at that
time and the promotion behind it — from the store, the real broker's log, the CLI and the
API, on both SQL backends, the same after a rebuild."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.lineage.api import create_router
from mlbus.consumers.lineage.audit import REQUEST_TOPICS, plan, request_plan, topics_of, verify
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.rollouts import RolloutQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.http import install_error_handlers
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import read_log
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import encode_new
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from mlbus.schemas.serving import InferenceLogged
from mlbus.schemas.traffic import ModelTraffic
from tests.consumers.lineage.conftest import cli_env, mlbus, ok, rebuilt_store
from tests.consumers.lineage.generator import GenRecord, as_log_records, produce

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CANARY = "rollout-canary-1"
SHADOW = "rollout-shadow-1"
ANALYSIS = {
    "verdict": "advance",
    "step": 0,
    "versions": {
        "1": {"requests": 1800, "served": 1800, "errors": 2, "error_ratio": 0.0011},
        "2": {"requests": 210, "served": 205, "errors": 0, "error_ratio": 0.0, "accuracy": 0.98},
    },
    "checks": [
        {"metric": "error_ratio", "passed": True, "reason": "error ratio 0 within 0.05"},
        {"metric": "latency_p99", "passed": True, "reason": "p99 within 1.5x"},
    ],
}


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def _traffic(
    rollout: str,
    strategy: str,
    status: str,
    candidate: str,
    weights: dict[str, int],
    *,
    step: int = 0,
    actor: str = "workflow",
    reason: str = "analysis",
    analysis: dict[str, Any] | None = None,
) -> Payload:
    return ModelTraffic.model_validate(
        {
            "model": "m",
            "rollout_id": rollout,
            "strategy": strategy,
            "status": status,
            "stable": "1" if candidate == "2" else "2",
            "candidate": candidate,
            "weights": weights,
            "shadow": strategy == "shadow",
            "step": step,
            "steps": [10, 50, 100] if strategy == "canary" else [],
            "reason": reason,
            "actor": actor,
            "analysis": analysis or {},
        }
    )


def _logged(request_id: str, version: str, **extra: Any) -> Payload:
    return InferenceLogged.model_validate(
        {
            "request_id": request_id,
            "model": "m",
            "version": version,
            "replica": "r1",
            "latency_seconds": 0.004,
            "predictions": [3],
            **extra,
        }
    )


#: 1 serves; alice starts a canary of 2 at 10%; the workflow advances it to 50% on its
#: analysis, then completes it and promotes 2; bob shadows 3 beside 2 and aborts it.
STARTED = _traffic(
    CANARY, "canary", "started", "2", {"1": 90, "2": 10}, actor="alice", reason="try v2 on a tenth"
)
ADVANCED = _traffic(
    CANARY,
    "canary",
    "advanced",
    "2",
    {"1": 50, "2": 50},
    step=1,
    reason="step 1 passed: error ratio 0 within 0.05",
    analysis=ANALYSIS,
)
COMPLETED = _traffic(CANARY, "canary", "completed", "2", {"2": 100}, step=2, reason="step 2 passed")
PROMOTED = ModelPromoted(
    model="m", version="2", previous_version="1", actor="workflow", reason=f"rollout {CANARY} done"
)
HISTORY: list[tuple[float, Payload]] = [
    (1, ModelPromoted(model="m", version="1", reason="first", actor="carol")),
    (1.5, DeploymentUpdated(model="m", version="1", replica="r1", status="loaded")),
    (2, STARTED),
    (3, _logged("req-stable", "1")),
    (3.2, _logged("req-early", "2")),
    (4, ADVANCED),
    (5, _logged("req-canary", "2")),
    (6, COMPLETED),
    (6.1, PROMOTED),
    (8, _traffic(SHADOW, "shadow", "started", "3", {"2": 100}, actor="bob", reason="mirror v3")),
    (8.5, _logged("req-shadow", "3", shadow=True, answered_by="2", agreement=1.0)),
    (8.5, _logged("req-shadow", "2")),
    (9, _traffic(SHADOW, "shadow", "aborted", "3", {"2": 100}, actor="bob", reason="enough")),
]


def _records() -> list[GenRecord]:
    out = []
    for minute, payload in HISTORY:
        ref, value = encode_new(payload, source="test", time=at(minute))
        out.append(GenRecord(ref.type, (ref.key or "").encode(), value))
    return out


def _check(store: LineageStore) -> None:
    q = RolloutQueries(store)
    canary, shadow = q.rollouts("m")
    assert (canary.rollout_id, canary.strategy, canary.status) == (CANARY, "canary", "completed")
    assert [c.status for c in canary.changes] == ["started", "advanced", "completed"]
    assert [c.actor for c in canary.changes] == ["alice", "workflow", "workflow"]
    advanced = canary.changes[1]
    assert advanced.weights == {"1": 50, "2": 50}
    summary = advanced.summary()
    assert summary["verdict"] == "advance"
    assert summary["versions"]["2"]["accuracy"] == 0.98
    assert summary["checks"][0]["reason"] == "error ratio 0 within 0.05"
    assert (shadow.status, shadow.ended is not None) == ("aborted", True)

    assert q.split("m", at(1.2)).weights == {"1": 100}
    early = q.split("m", at(3))
    assert (early.weights, early.change and early.change.actor) == ({"1": 90, "2": 10}, "alice")
    assert q.split("m", at(5)).weights == {"1": 50, "2": 50}
    assert q.split("m", at(7)).weights == {"2": 100} and q.split("m", at(7)).change is None
    # completed, its promotion not yet in the log: the candidate takes all the same
    assert q.split("m", at(6.05)).weights == {"2": 100}
    assert q.served("m", "2", at(6.05)).role == "stable"
    mirrored = q.split("m", at(8.5))
    assert (mirrored.weights, mirrored.shadow) == ({"2": 100}, "3")
    assert q.split("m").weights == {"2": 100}

    served = q.served("m", "2", at(5))
    assert served.role == "candidate" and served.split.weights == {"1": 50, "2": 50}
    assert served.rollout is not None and served.rollout.rollout_id == CANARY
    assert [c.status for c in served.rollout.changes] == ["started", "advanced"]
    assert served.promotion is None  # promoted only once the rollout completed
    assert q.served("m", "1", at(3)).role == "stable"
    after = q.served("m", "2", at(7))
    assert after.role == "stable" and after.promotion and after.promotion.actor == "workflow"
    assert q.served("m", "3", at(8.5), shadow=True).role == "shadow"


def test_rollouts_are_projected_and_the_split_answered_at_any_time(store: LineageStore) -> None:
    records = as_log_records(_records())
    Projector(store).project(reversed(records), batch_size=4)  # arrival order does not matter
    _check(store)
    # the version audit names the rollout that brought it in
    report = plan(store, "m", "2")
    assert [e.type for e in report.events].count("model.traffic") == 3


def test_a_request_answered_by_a_canary_is_audited_from_the_log(
    kafka: KafkaConfig, store: LineageStore, tmp_path: Path
) -> None:
    produce(kafka, _records())
    Projector(store).project(read_log(kafka, TOPICS))
    _check(store)

    done = request_plan(store, "req-canary", read_log(kafka, REQUEST_TOPICS))
    [answer] = done.answers
    assert (answer.served.version, answer.served.role) == ("2", "candidate")
    assert answer.served.split.weights == {"1": 50, "2": 50}
    assert answer.served.rollout and answer.served.rollout.rollout_id == CANARY
    assert done.report is not None
    verify(done.report, read_log(kafka, topics_of(done.report)))
    assert done.ok, done.report.events
    types = [e.type for e in done.report.events]
    assert types.count("model.traffic") == 2 and "inference.logged" in types

    shadowed = request_plan(store, "req-shadow", read_log(kafka, REQUEST_TOPICS))
    roles = sorted((a.served.version, a.served.role) for a in shadowed.answers)
    assert roles == [("2", "stable"), ("3", "shadow")]
    assert request_plan(store, "nobody", read_log(kafka, REQUEST_TOPICS)).answers == []

    other = rebuilt_store(store, read_log(kafka, TOPICS))
    try:
        assert other.dump_json() == store.dump_json()
        _check(other)
    finally:
        other.drop()
        other.close()

    app = FastAPI()
    app.include_router(create_router(lambda: store, lambda: kafka))
    install_error_handlers(app)
    client = TestClient(app)
    body = client.get("/lineage/requests/req-canary").json()
    assert body["ok"] and body["answers"][0]["served"]["role"] == "candidate"
    split = body["answers"][0]["served"]["split"]
    assert split["weights"] == {"1": 50, "2": 50} and split["change"]["rollout_id"] == CANARY
    assert client.get("/lineage/requests/nobody").status_code == 404
    rollouts = client.get("/lineage/models/m/rollouts").json()
    assert [r["rollout_id"] for r in rollouts] == [CANARY, SHADOW]
    assert rollouts[0]["changes"][1]["summary"]["verdict"] == "advance"
    then = client.get("/lineage/models/m/split", params={"as_of": at(3).isoformat()}).json()
    assert then["weights"] == {"1": 90, "2": 10}
    why = client.get("/lineage/models/m/versions/2/why").json()
    assert [r["rollout_id"] for r in why["rollouts"]] == [CANARY]
    assert why["decisions"][0]["reason"] == f"rollout {CANARY} done"


def test_the_cli_audits_a_request_and_lists_rollouts(kafka: KafkaConfig, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    produce(kafka, _records())
    store = LineageStore.open(url)
    Projector(store).project(read_log(kafka, TOPICS))
    store.close()
    env = cli_env(kafka, tmp_path, url)
    body = json.loads(ok(mlbus("audit", "--request", "req-canary", "--json", env=env)).stdout)
    assert body["ok"] and body["answers"][0]["served"]["role"] == "candidate"
    text = ok(mlbus("audit", "--request", "req-canary", env=env)).stdout
    assert "as candidate" in text and "1 50%, 2 50%" in text and "by alice: try v2" in text
    listed = ok(mlbus("lineage", "rollouts", "m", env=env)).stdout
    assert CANARY in listed and "step 2/3 [1 50%, 2 50%] by workflow" in listed
    assert "split 2 100%" in listed
    why = ok(mlbus("lineage", "why", "m@2", env=env)).stdout
    assert f"canary rollout {CANARY} beside 1: completed" in why and "by alice: try v2" in why
    missing = mlbus("audit", "--request", "nobody", env=env)
    assert missing.returncode == 1
