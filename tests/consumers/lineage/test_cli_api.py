"""`mlbus lineage …` and `mlbus audit` as a user runs them (subprocesses against the test's
broker and store), and the HTTP router."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.lineage.api import router
from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.store import LineageStore
from mlbus.http import install_error_handlers
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.codec import encode_new
from tests.consumers.lineage.conftest import cli_env, mlbus, ok
from tests.consumers.lineage.generator import GenRecord, as_log_records, produce
from tests.consumers.lineage.test_timetravel import HISTORY, at


def _history_records() -> list[GenRecord]:
    out = []
    for minute, payload, event_id in HISTORY:
        ref, value = encode_new(payload, source="test", time=at(minute), event_id=event_id)
        out.append(GenRecord(ref.type, (ref.key or "").encode(), value))
    return out


@pytest.fixture
def env(kafka: KafkaConfig, tmp_path: Path) -> dict[str, str]:
    produce(kafka, _history_records())
    env = cli_env(kafka, tmp_path, f"sqlite:///{tmp_path / 'lineage.db'}")
    result = ok(mlbus("lineage", "rebuild", env=env))
    assert "rebuilt from kafka" in result.stdout
    return env


def test_show_downstream_why_history_and_dump(env: dict[str, str]) -> None:
    shown = json.loads(
        ok(mlbus("lineage", "show", "m", "--as-of", at(12).isoformat(), "--json", env=env)).stdout
    )
    assert (shown["version"], shown["serving"], shown["run"]["run_id"]) == ("2", True, "r2")
    assert shown["datasets"][0]["parents"][0]["name"] == "A"
    tree = ok(mlbus("lineage", "show", "m@2", env=env)).stdout
    assert "run r2" in tree and "dataset A@v1" in tree and "alice" in tree
    dot = ok(mlbus("lineage", "show", "m@2", "--dot", env=env)).stdout
    assert dot.startswith("digraph") and '"run:r2" -> "model:m@2"' in dot
    mermaid = ok(mlbus("lineage", "downstream", "B@v1", "--mermaid", env=env)).stdout
    assert mermaid.startswith("flowchart LR")
    down = ok(mlbus("lineage", "downstream", "A", env=env)).stdout
    assert "derived → B@v1" in down and "serving" in down
    why = ok(mlbus("lineage", "why", "m@3", env=env)).stdout
    assert "rejected" in why and "margin" in why and "p v2" in why
    history = ok(mlbus("lineage", "history", "m", env=env)).stdout
    assert "rolled back to" in history
    dumped = json.loads(ok(mlbus("lineage", "dump", env=env)).stdout)
    assert len(dumped["decisions"]) == 4 and len(dumped["dataset_versions"]) == 2


def test_errors_are_one_line(env: dict[str, str]) -> None:
    result = mlbus("lineage", "show", "nobody", env=env)
    assert result.returncode == 1 and "no version of model 'nobody'" in result.stderr
    result = mlbus("lineage", "show", "m", "--as-of", "yesterday", env=env)
    assert result.returncode == 1 and "ISO 8601" in result.stderr
    assert "Traceback" not in result.stderr


def test_audit_verifies_every_event_against_the_log(env: dict[str, str]) -> None:
    result = ok(mlbus("audit", "m@2", "--json", env=env))
    report = json.loads(result.stdout)
    assert report["ok"] and report["counts"] == {"verified": len(report["events"])}
    types = [e["type"] for e in report["events"]]
    # time order: the datasets, the request, the run, the promotion, the deployment
    assert types == [
        "dataset.created",
        "dataset.created",
        "training.requested",
        "training.started",
        "training.completed",
        "model.promoted",
        "deployment.updated",
    ]
    text = ok(mlbus("audit", "m@1", env=env)).stdout
    assert "✓" in text and "verified" in text


def test_audit_fails_when_the_log_lost_an_event(
    kafka: KafkaConfig, tmp_path: Path, env: dict[str, str]
) -> None:
    # a store projected from a log the cluster does not have: every event is missing
    from tests.consumers.lineage.generator import generate_log

    other = LineageStore.open(f"sqlite:///{tmp_path / 'other.db'}")
    Projector(other).project(as_log_records(generate_log(300, seed=2)))
    version = other.dump()["model_versions"][0]
    other.close()
    env = env | {"MLBUS_METADATA_URL": f"sqlite:///{tmp_path / 'other.db'}"}
    result = mlbus("audit", f"{version['model']}@{version['version']}", "--json", env=env)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and report["counts"].get("missing", 0) > 0


def test_http_router(store: LineageStore) -> None:
    from mlbus.kafka.reader import LogRecord
    from mlbus.schemas.codec import STRUCTURED_HEADERS

    records = [
        LogRecord(r.topic, 0, i, None, r.key, tuple(STRUCTURED_HEADERS), r.value)
        for i, r in enumerate(_history_records())
    ]
    Projector(store).project(records)
    app = FastAPI()
    install_error_handlers(app)
    app.state.lineage_store = store
    app.include_router(router)
    client = TestClient(app)
    up = client.get("/lineage/models/m/upstream", params={"as_of": at(12).isoformat()})
    assert up.status_code == 200 and up.json()["version"] == "2"
    assert client.get("/lineage/models/m/serving").json()["version"] == "1"
    dot = client.get("/lineage/models/m/upstream", params={"version": "2", "format": "dot"})
    assert dot.text.startswith("digraph")
    why = client.get("/lineage/models/m/versions/3/why").json()
    assert why["decisions"][0]["kind"] == "rejected"
    down = client.get("/lineage/datasets/A/downstream").json()
    assert down["versions"][0]["derived"] == ["dataset:B@v1"]
    assert len(client.get("/lineage/models/m/history").json()) == 4
    unknown = client.get("/lineage/models/nobody/upstream")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotInLineage"
    bad_time = client.get("/lineage/models/m/upstream", params={"as_of": "x"})
    assert bad_time.status_code == 422 and "ISO 8601" in bad_time.json()["error"]["message"]
