"""Serving means loaded by a replica (deployment.updated), not last promoted: a champion that
failed to load is promoted but not serving, with the replicas' reason, and the version that
keeps serving is shown serving — in the queries, `GET /models`, `mlbus models list` and
/ui, on both backends, and the same after a rebuild from the real broker's log."""

from __future__ import annotations

import json
import random
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.lineage.api import create_router, models_router
from mlbus.consumers.lineage.graph import to_dot, upstream_graph
from mlbus.consumers.lineage.live import LiveProjector
from mlbus.consumers.lineage.projector import TOPICS, Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import LogRecord, read_log
from mlbus.schemas.base import Payload
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from tests.consumers.lineage.conftest import cli_env, mlbus, ok, rebuilt_store
from tests.consumers.lineage.generator import GenRecord, produce
from tests.consumers.lineage.test_live import caught_up
from tests.mlbus.kafka.support import wait_until

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SHA = "sha256:" + "cd" * 32
#: What the deployer reports for a promotion of bytes that are not safetensors.
REASON = "InvalidArtifact: the artifact is not a safetensors file: header too large"


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def _promoted(version: str, previous: str | None = None) -> Payload:
    return ModelPromoted.model_validate(
        {
            "model": "m",
            "version": version,
            "previous_version": previous,
            "reason": "better",
            "actor": "workflow",
        }
    )


def _deployed(version: str, replica: str, status: str, error: str | None = None) -> Payload:
    return DeploymentUpdated.model_validate(
        {"model": "m", "version": version, "replica": replica, "status": status, "error": error}
    )


#: Version 1 serves on two replicas; version 2 is promoted and fails to load on both (final);
#: a third replica starts later and, walking back from the champion, serves 1 too.
HISTORY: list[tuple[float, Payload]] = [
    (1, _promoted("1")),
    (2, _deployed("1", "r1", "loaded")),
    (2.5, _deployed("1", "r2", "loaded")),
    (5, _promoted("2", previous="1")),
    (6, _deployed("2", "r1", "failed", REASON)),
    (6.5, _deployed("2", "r2", "failed", REASON)),
    (8, _deployed("2", "r3", "failed", REASON)),
    (8.5, _deployed("1", "r3", "loaded")),
    (9, _deployed("1", "r2", "unloaded")),  # an operator unloaded the model on r2
]


def _records() -> list[GenRecord]:
    out = []
    for minute, payload in HISTORY:
        ref, value = encode_new(payload, source="test", time=at(minute))
        out.append(GenRecord(ref.type, (ref.key or "").encode(), value))
    return out


def _project(store: LineageStore) -> None:
    records = [
        LogRecord(r.topic, 0, i, None, r.key, tuple(STRUCTURED_HEADERS), r.value)
        for i, r in enumerate(_records())
    ]
    random.Random(3).shuffle(records)  # arrival order does not matter
    Projector(store).project(records, batch_size=3)


def _check(queries: LineageQueries) -> None:
    """Every answer about what serves, for the history above, as of now and before."""
    assert (queries.serving("m"), queries.champion("m")) == ("1", "2")
    assert queries.replicas("m") == {"r1": "1", "r3": "1"}
    assert queries.serving("m", at(1.5)) is None  # promoted, not loaded yet
    assert queries.serving("m", at(5.5)) == "1"  # 2 promoted, still loading

    [summary] = queries.models()
    assert summary.champion is not None and summary.champion.version == "2"
    assert (summary.serving, summary.replicas) == ("1", {"r1": "1", "r3": "1"})
    versions = {v.version: v for v in summary.versions}
    two, one = versions["2"], versions["1"]
    assert (two.status, two.serving, two.replicas, two.load_failure) == (
        "champion",
        False,
        [],
        REASON,
    )
    assert (one.status, one.serving, one.replicas, one.load_failure) == (
        "promoted before",
        True,
        ["r1", "r3"],
        None,
    )
    # Before the failures were reported, 2 was loading: not serving, no failure either.
    [then] = queries.models(at(5.5))
    then_two = next(v for v in then.versions if v.version == "2")
    assert (then.serving, then_two.serving, then_two.load_failure) == ("1", False, None)

    up = queries.upstream("m")  # no version: the one serving, not the champion
    assert (up.version, up.serving, up.replicas) == ("1", True, ["r1", "r3"])
    failed = queries.upstream("m", "2")
    assert (failed.serving, failed.load_failure) == (False, REASON)
    assert "failed to load" in to_dot(upstream_graph(failed), "m@2")


def test_a_champion_that_failed_to_load_is_promoted_but_not_serving(
    store: LineageStore,
) -> None:
    _project(store)
    _check(LineageQueries(store))


def test_the_http_listing_and_the_ui_show_what_serves(store: LineageStore) -> None:
    from mlbus.cli.ui import create_router as ui_router

    _project(store)
    app = FastAPI()
    app.state.lineage_store = store
    app.include_router(models_router(lambda: store))
    app.include_router(create_router(lambda: store))
    app.include_router(ui_router(lambda: store))
    client = TestClient(app)
    [model] = client.get("/models").json()
    assert model["serving"] == "1" and model["champion"]["version"] == "2"
    two = next(v for v in model["versions"] if v["version"] == "2")
    assert (two["serving"], two["load_failure"]) == (False, REASON)
    assert client.get("/lineage/models/m/serving").json()["version"] == "1"
    page = client.get("/ui").text
    assert "champion 2: failed to load" in page and "header too large" in page


def test_live_projection_and_a_rebuild_agree_on_what_serves(
    kafka: KafkaConfig, store: LineageStore, group: str, tmp_path: Path
) -> None:
    projector = LiveProjector(kafka, store, group=group)
    thread = threading.Thread(
        target=projector.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    try:
        ends = produce(kafka, _records())
        wait_until(lambda: caught_up(store, ends), "the live projector to catch up", 60)
    finally:
        projector.stop()
        thread.join(30)
    assert not thread.is_alive()
    _check(LineageQueries(store))

    other = rebuilt_store(store, read_log(kafka, TOPICS))
    try:
        assert other.dump_json() == store.dump_json()
        _check(LineageQueries(other))
    finally:
        other.drop()
        other.close()


@pytest.mark.parametrize("json_out", [True, False])
def test_models_list_shows_serving_and_the_failure(
    kafka: KafkaConfig, tmp_path: Path, json_out: bool
) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    store = LineageStore.open(url)
    _project(store)
    store.close()
    env = cli_env(kafka, tmp_path, url)
    if json_out:
        [model] = json.loads(ok(mlbus("models", "list", "--json", env=env)).stdout)
        assert model["serving"] == "1"
        return
    text = ok(mlbus("models", "list", env=env)).stdout
    row_two = next(line for line in text.splitlines() if "champion" in line)
    assert "no" in row_two and "failed to load" in row_two
