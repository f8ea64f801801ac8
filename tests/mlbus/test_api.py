"""The control plane's own parts (create_app): bearer-token auth on mutating endpoints only,
training requests published as events (their dataset version resolved to the full one
first), the model listing answered from the lineage store, /metrics and the supervisor's
status."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mlbus.cli.control_plane import create_app
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.consumers.workflow.state import read_state
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.kafka.reader import read_log
from mlbus.settings import Settings
from tests.consumers.lineage.generator import generate_log, produce
from tests.mlbus.kafka.support import dataset, read_events
from tests.promtool import check_metrics

#: The version users type is a prefix of the one in the log; events carry the full one.
FULL = "abc" + "0" * 61
REQUEST = {"model": "digits-cnn", "dataset": {"name": "digits", "version": "abc"}, "family": "cnn"}


def announce_dataset(kafka: KafkaConfig) -> None:
    with EventProducer(kafka, source="test") as producer:
        producer.publish(dataset(name="digits", version=FULL))
        producer.flush()


def settings_for(kafka: KafkaConfig, tmp_path: Path, **changes: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap_servers=kafka.bootstrap,
        topic_prefix=kafka.topic_prefix,
        kafka={"fetch.wait.max.ms": "10"},
        **changes,
    )


@pytest.fixture
def guarded(kafka: KafkaConfig, tmp_path: Path) -> TestClient:
    return TestClient(create_app(settings_for(kafka, tmp_path, api_token="s3cret")))


def test_a_mutating_request_without_the_token_is_refused_and_publishes_nothing(guarded, kafka):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        response = guarded.post("/training/requests", json=REQUEST, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["type"] == "Unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert read_events(kafka, "training.requested") == []


def test_with_the_token_a_training_request_becomes_an_event(guarded, kafka):
    announce_dataset(kafka)
    response = guarded.post(
        "/training/requests", json=REQUEST, headers={"Authorization": "Bearer s3cret"}
    )
    assert response.status_code == 202, response.text
    [event] = read_events(kafka, "training.requested")
    assert event.id == response.json()["event_id"]
    assert event.data.model == "digits-cnn" and event.data.requested_by == "api"
    assert event.data.dataset.version == FULL  # resolved at the edge


def test_a_training_request_for_an_unknown_dataset_version_is_refused(kafka, tmp_path):
    announce_dataset(kafka)
    client = TestClient(create_app(settings_for(kafka, tmp_path)))
    other = REQUEST | {"dataset": {"name": "digits", "version": "abd"}}
    response = client.post("/training/requests", json=other)
    assert response.status_code == 404, response.text
    assert "dataset digits@abd: no version 'abd'" in response.json()["error"]["message"]
    assert read_events(kafka, "training.requested") == []


def test_reading_needs_no_token(guarded):
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/services").json() == {"pid": None, "services": []}


def test_an_invalid_training_request_names_the_field(kafka, tmp_path):
    client = TestClient(create_app(settings_for(kafka, tmp_path)))
    response = client.post("/training/requests", json=REQUEST | {"seed": "zero"})
    assert response.status_code == 422
    assert "seed" in response.json()["error"]["message"]


def test_metrics_count_requests_by_route_and_status(kafka, tmp_path):
    client = TestClient(create_app(settings_for(kafka, tmp_path)))
    client.get("/health")
    client.get("/nowhere")
    text = client.get("/metrics").text
    assert 'mlbus_api_requests_total{method="GET",route="/health",status="200"} 1.0' in text
    assert 'route="(unmatched)",status="404"' in text
    assert "mlbus_api_request_duration_seconds_bucket" in text
    assert "process_resident_memory_bytes" in text and "python_info" in text
    check_metrics(text)
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_training_requests_share_one_producer_closed_at_shutdown(kafka, tmp_path):
    announce_dataset(kafka)
    app = create_app(settings_for(kafka, tmp_path))
    with TestClient(app) as client:
        ids = [client.post("/training/requests", json=REQUEST).json()["event_id"] for _ in "ab"]
        assert app.state.producer.opened
    assert not app.state.producer.opened  # closed by the app's shutdown
    assert [e.id for e in read_events(kafka, "training.requested")] == ids


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_models_are_listed_from_the_lineage_store_without_the_log(kafka, tmp_path):
    produce(kafka, generate_log(600, seed=3))
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    with LineageStore.open(url) as store:
        Projector(store).project(read_log(kafka, TOPICS))
    state = read_state(kafka)  # what the workflow makes of the same log
    # The API's broker is a closed port: a listing that read the log could not answer.
    gone = Settings(
        data_dir=tmp_path / "data",
        metadata_url=url,
        kafka_bootstrap_servers=f"127.0.0.1:{_closed_port()}",
    )
    response = TestClient(create_app(gone)).get("/models")
    assert response.status_code == 200, response.text
    listed = {m["model"]: m for m in response.json()}
    assert listed and sorted(listed) == sorted(state.models)
    with LineageStore(url) as store:
        promoted = {name: LineageQueries(store).champion(name) for name in listed}
    for name, model in state.models.items():
        # The champion is the store's newest promotion (what serves is another question:
        # what the replicas loaded, tests/consumers/lineage/test_serving.py).
        # (The workflow's state may differ on a duplicate delivery of an older promotion,
        # which it moves to its new place in the log; the store keeps the first delivery.)
        champion = listed[name]["champion"]
        assert (champion["version"] if champion else None) == promoted[name], name
        statuses = {v["version"]: v["status"] for v in listed[name]["versions"]}
        assert set(statuses) == set(model.runs) | {p.data.version for p in model.promotions}
        rolled_back = model.rolled_back() - {promoted[name]}
        assert {v for v, s in statuses.items() if s == "rolled back"} == rolled_back, name
        assert {v for v, s in statuses.items() if s == "rejected"} == (
            set(model.rejected) - model.rolled_back() - {p.data.version for p in model.promotions}
        ), name
        trained = {v["version"]: v for v in listed[name]["versions"] if v["run_id"]}
        for version, run in model.runs.items():
            assert trained[version]["run_id"] == run.data.run_id
            assert trained[version]["dataset"] == run.data.dataset.model_dump()


def test_a_training_request_for_an_unknown_family_is_refused_before_publishing(kafka, tmp_path):
    announce_dataset(kafka)
    client = TestClient(create_app(settings_for(kafka, tmp_path)))
    response = client.post("/training/requests", json=REQUEST | {"family": "transformer"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (
        error["type"] == "InvalidModelSpec"
        and "unknown model family 'transformer'" in (error["message"])
    )
    bad = REQUEST | {"hyperparameters": {"layers": 99}}
    response = client.post("/training/requests", json=bad | {"family": "mlp"})
    assert response.status_code == 400 and "layers=99" in response.json()["error"]["message"]
    # A plugin that does not import, and a task the family does not have: refused too.
    broken = REQUEST | {"family": "no_such_module_here:build", "hyperparameters": {}}
    response = client.post("/training/requests", json=broken)
    assert response.status_code == 400
    assert "cannot be imported: ModuleNotFoundError" in response.json()["error"]["message"]
    quick = tmp_path / "api_quick_family.py"
    quick.write_text("def build(s, n, p):\n    pass\n\nbuild.tasks = ('regression',)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        response = client.post(
            "/training/requests",
            json=REQUEST
            | {"family": "api_quick_family:build", "task": "classification", "hyperparameters": {}},
        )
    finally:
        sys.path.remove(str(tmp_path))
    assert response.status_code == 400
    assert "does not support task 'classification'" in response.json()["error"]["message"]
    assert read_events(kafka, "training.requested") == []
    # A number without a fraction is the integer JSON says it is; a string is not.
    response = client.post("/training/requests", json=REQUEST | {"max_epochs": 3.0})
    assert response.status_code == 202, response.text
    [event] = read_events(kafka, "training.requested")
    assert event.data.max_epochs == 3 and isinstance(event.data.max_epochs, int)
    response = client.post("/training/requests", json=REQUEST | {"max_epochs": "3"})
    assert response.status_code == 422 and "max_epochs" in response.json()["error"]["message"]
    document = client.get("/openapi.json").json()
    family = document["components"]["schemas"]["TrainingRequested"]["properties"]["family"]
    assert {"cnn", "mlp"} <= set(family["enum"])
