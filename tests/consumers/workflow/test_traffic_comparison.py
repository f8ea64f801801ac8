"""A shadow's (or an A/B experiment's) comparison so far, on the real broker: `GET
/models/{m}/traffic` and `mlbus models traffic` show each version's figures in the current
step from the streams' windows (samples, error ratio, p99, accuracy once labelled, a shadow's
agreement), by the analysis that decides a canary's steps — and nothing is published."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.workflow import commands
from mlbus.consumers.workflow.api import create_router
from mlbus.http import install_error_handlers
from mlbus.schemas.serving import ServingAccuracy
from tests.consumers.lineage.conftest import cli_env, mlbus, ok
from tests.consumers.workflow.support import completed, send
from tests.consumers.workflow.test_rollout import window
from tests.mlbus.kafka.support import read_events


def accuracy(version: str, start, labelled: int, correct: int) -> ServingAccuracy:
    return ServingAccuracy(
        model="m1",
        version=version,
        window_start=start,
        window_end=start + timedelta(seconds=10),
        labelled=labelled,
        correct=correct,
        accuracy=correct / labelled,
    )


def test_a_shadow_compared_so_far_from_the_windows(kafka, tmp_path: Path) -> None:
    send(kafka, completed("m1", "a", 0.95), completed("m1", "b", 0.97))
    commands.promote(kafka, "m1", "a", reason="first", actor="tests")
    begun = commands.promote(kafka, "m1", "b", reason="mirror", actor="tests", strategy="shadow")
    t0 = begun.time
    shadowed = window("b", t0, 400, errors=2, p99=0.02).model_copy(
        update={"shadowed": 400, "agreement": 0.9}
    )
    send(
        kafka,
        window("a", t0 - timedelta(seconds=10), 999),  # before the shadow began: not counted
        window("a", t0, 400, errors=1, client_errors=20, p99=0.01),
        shadowed,
        window("b", t0 + timedelta(seconds=10), 100, p99=0.02).model_copy(
            update={"shadowed": 100, "agreement": 0.5}
        ),
        window("a", t0 + timedelta(seconds=10), 100, p99=0.01),
        accuracy("a", t0, 60, 57),
        accuracy("b", t0, 60, 58),
    )
    compared = commands.comparison(kafka, begun)
    assert compared is not None
    a, b = (compared.analysis["versions"][v] for v in ("a", "b"))
    assert (a["served"], a["errors"], a["client_errors"], a["windows"]) == (480, 1, 20, 2)
    assert (b["served"], b["errors"], b["shadowed"]) == (500, 2, 500)
    assert b["agreement"] == 0.82  # (400 * 0.9 + 100 * 0.5) / 500
    assert (a["accuracy"], b["accuracy"]) == (0.95, round(58 / 60, 6))
    assert "agreement" not in a
    checks = {c["metric"]: c for c in compared.analysis["checks"]}
    assert checks["latency_p99"]["passed"] is False  # 0.02 s against 0.01 s: twice as slow
    assert compared.verdict == "abort"  # what a canary step would do; nothing is published

    app = FastAPI()
    app.include_router(create_router(lambda: kafka))
    install_error_handlers(app)
    body = TestClient(app).get("/models/m1/traffic").json()
    assert body["strategy"] == "shadow"
    assert body["comparison"]["versions"]["b"]["agreement"] == 0.82
    assert body["comparison"]["verdict"] == "abort"

    env = cli_env(kafka, tmp_path, f"sqlite:///{tmp_path / 'lineage.db'}")
    shown = json.loads(ok(mlbus("models", "traffic", "m1", "--json", env=env)).stdout)
    assert shown["comparison"]["versions"]["a"]["served"] == 480
    text = ok(mlbus("models", "traffic", "m1", env=env)).stdout
    assert "b (candidate)" in text and "0.8200" in text and "a (stable)" in text

    assert [e.data.status for e in read_events(kafka, "model.traffic")] == ["started"]

    # Once the rollout ended, its last event carries the analysis: no comparison.
    commands.abort(kafka, "m1", reason="enough", actor="tests")
    assert TestClient(app).get("/models/m1/traffic").json()["comparison"] is None
