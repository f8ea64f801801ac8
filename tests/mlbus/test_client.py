"""mlbus.client against the real control-plane app (create_app) and the session broker:
each method reaches its endpoint, and errors come back as ApiError with the API's type."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mlbus.cli.control_plane import create_app
from mlbus.client import ApiError, Client
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import read_log
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import TrainingRequested
from tests.consumers.workflow.support import DIGITS_YAML, completed, send
from tests.mlbus.kafka.support import read_events
from tests.mlbus.test_api import FULL, announce_dataset, settings_for


def client_for(kafka: KafkaConfig, tmp_path: Path, token: str | None = None) -> Client:
    app = create_app(
        settings_for(kafka, tmp_path, api_token="s3cret", metadata_url=lineage(tmp_path))
    )
    return Client(token=token, http=TestClient(app))


def lineage(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'lineage.db'}"


def project(kafka: KafkaConfig, tmp_path: Path) -> None:
    """What `mlbus lineage project` does for the API's listings: the log into its store."""
    with LineageStore.open(lineage(tmp_path)) as store:
        Projector(store).project(read_log(kafka, TOPICS))


def test_training_requests_pipelines_and_models(kafka, tmp_path):
    with client_for(kafka, tmp_path, token="s3cret") as client:
        assert client.health()["status"] == "ok"
        announce_dataset(kafka)  # digits@FULL: the API resolves the prefix "abc" to it
        request = TrainingRequested(
            model="digits-cnn", dataset=DatasetRef(name="digits", version="abc"), family="cnn"
        )
        typed = client.request_training(request)
        plain = client.request_training(
            {"model": "m2", "dataset": {"name": "digits", "version": "abc"}, "family": "cnn"}
        )
        # Keyed by model: the two may be on different partitions, in no defined order.
        events = {e.id: e for e in read_events(kafka, "training.requested")}
        assert events.keys() == {typed, plain}
        assert events[typed].data.model == "digits-cnn" and events[plain].data.model == "m2"
        assert events[typed].data.requested_by == "api"
        assert {e.data.dataset.version for e in events.values()} == {FULL}

        applied = client.apply_pipeline(DIGITS_YAML.read_text(), actor="user:ann")
        assert applied["published"] and applied["revision"] == 1
        assert not client.apply_pipeline(DIGITS_YAML.read_text())["published"]
        assert [p["name"] for p in client.pipelines()] == ["digits"]

        send(kafka, completed("digits", "v1", 0.96))
        promoted = client.promote("digits", "v1", reason="first", actor="ops")
        assert (promoted["version"], promoted["actor"]) == ("v1", "ops")
        project(kafka, tmp_path)
        [model] = client.models()
        assert model["model"] == "digits" and model["champion"]["version"] == "v1"


def test_errors_carry_the_status_and_the_api_type(kafka, tmp_path):
    with client_for(kafka, tmp_path) as anonymous:
        assert anonymous.models() == []  # reading needs no token
        with pytest.raises(ApiError) as refused:
            anonymous.promote("digits", "v1", reason="no token")
        assert (refused.value.http_status, refused.value.kind) == (401, "Unauthorized")
    with client_for(kafka, tmp_path, token="s3cret") as client:
        with pytest.raises(ApiError) as unknown:
            client.promote("nobody", "v1", reason="no such model")
        assert (unknown.value.http_status, unknown.value.kind) == (404, "UnknownModel")
        with pytest.raises(ApiError) as invalid:
            client.request_training({"model": "m"})
        assert invalid.value.http_status == 422 and "dataset" in invalid.value.message
