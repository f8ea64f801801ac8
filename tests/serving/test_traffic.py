"""Rollouts on a running replica, started as users start them (the commands behind `mlbus
models promote --canary|--shadow|--ab` and the control-plane API): the candidate is loaded
beside the champion and requests are split by a stable hash of their routing key; a shadow
answers copies that reach the log, never a caller; bad requests change nothing; abort and
completion end the split."""

from __future__ import annotations

from collections import Counter

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.workflow import commands
from mlbus.consumers.workflow.api import create_router
from mlbus.consumers.workflow.commands import InvalidRollout, RolloutConflict
from mlbus.errors import UnknownModel
from mlbus.http import install_error_handlers
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import Artifact, CodeVersion, TrainingCompleted
from mlbus.serving.registry import BUCKETS, bucket
from tests.mlbus.kafka.support import publish, read_events, wait_until
from tests.serving.conftest import Running, body, running, save, wait_version

MODEL = "digits"


def completed(version: str, artifact: Artifact) -> TrainingCompleted:
    return TrainingCompleted(
        run_id=f"run-{version}",
        model=MODEL,
        version=version,
        request_id=f"req-{version}",
        family="cnn",
        dataset=DatasetRef(name="digits", version="test"),
        artifact=artifact,
        metrics={"test": {"accuracy": 0.9}},
        seed=0,
        epochs=1,
        code=CodeVersion(package_version="test"),
        duration_seconds=1.0,
    )


@pytest.fixture
def versions(kafka, store, digits):
    """Versions 1 (promoted) and 2 (trained, not promoted) of digits in the log."""
    v1 = save(store, digits.v1, "models/digits/v1")
    v2 = save(store, digits.v2, "models/digits/v2")
    publish(kafka, [completed("1", v1), completed("2", v2)])
    commands.promote(kafka, MODEL, "1", reason="first", actor="tests")
    return v1, v2


def routed(srv: Running, weight: int | None = None, shadow: bool = False) -> None:
    def applied() -> bool:
        slot = srv.server.registry.find_slot(MODEL)
        route = slot.route if slot else None
        if route is None or slot is None or slot.candidate is None:
            return False
        return route.shadow if shadow else route.candidate_weight == weight

    wait_until(applied, "the rollout to be applied")


def answer(client: httpx.Client, rows: np.ndarray, **kwargs) -> str:
    r = client.post(f"/v2/models/{MODEL}/infer", **kwargs)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def test_a_canary_at_10_percent_answers_a_tenth_and_keeps_each_key_on_one_version(
    kafka, store, digits, versions
):
    rows = digits.x[:1]
    with running(kafka, store, max_wait_us=0) as srv:
        wait_version(srv, MODEL, "1")
        event = commands.promote(
            kafka, MODEL, "2", reason="try it", actor="tests", strategy="canary", weight=10
        )
        assert (event.type, event.data.weights, event.data.steps) == (
            "model.traffic",
            {"1": 90, "2": 10},
            [10, 100],
        )
        routed(srv, 10)
        payload = body(rows)
        with srv.client() as client:
            share = Counter(
                answer(client, rows, json={**payload, "id": f"request-{i}"}) for i in range(2000)
            )
            assert share["1"] + share["2"] == 2000
            assert abs(share["2"] / 2000 - 0.10) <= 0.02, share
            # One request id, one version, however often it is sent.
            again = {answer(client, rows, json={**payload, "id": "request-7"}) for _ in range(20)}
            assert len(again) == 1
            # A routing key (header or request parameter) keeps a caller on one version,
            # whatever the request ids: one key that the hash puts on the candidate, one not.
            rollout = event.data.rollout_id
            keys = [f"user-{i}" for i in range(200)]
            on_candidate = next(k for k in keys if bucket(rollout, k) < BUCKETS // 10)
            on_stable = next(k for k in keys if bucket(rollout, k) >= BUCKETS // 10)
            for key, version in ((on_candidate, "2"), (on_stable, "1")):
                by_header = {
                    answer(
                        client,
                        rows,
                        json={**payload, "id": f"{key}-{i}"},
                        headers={"X-Mlbus-Routing-Key": key},
                    )
                    for i in range(30)
                }
                by_parameter = {
                    answer(
                        client,
                        rows,
                        json={**payload, "id": f"{key}-p{i}", "parameters": {"routing_key": key}},
                    )
                    for i in range(30)
                }
                assert by_header == by_parameter == {version}
            # A version asked for by name answers, whatever the split.
            r = client.post(f"/v2/models/{MODEL}/versions/2/infer", json=payload)
            assert r.status_code == 200 and r.json()["model_version"] == "2"
            bad = client.post(
                f"/v2/models/{MODEL}/infer", json={**payload, "parameters": {"routing_key": 7}}
            )
            assert bad.status_code == 400 and "routing_key" in bad.json()["error"]

        # Aborted: every request back on the stable version, the candidate retired.
        commands.abort(kafka, MODEL, reason="enough", actor="tests")
        wait_until(
            lambda: srv.server.registry.find_slot(MODEL).candidate is None, "the candidate retired"
        )
        with srv.client() as client:
            assert {answer(client, rows, json={**payload, "id": f"x-{i}"}) for i in range(50)} == {
                "1"
            }
    events = read_events(kafka, "model.traffic")
    assert [(e.data.status, e.data.weights) for e in events] == [
        ("started", {"1": 90, "2": 10}),
        ("aborted", {"1": 100}),
    ]
    assert events[1].data.rollout_id == events[0].data.rollout_id
    loads = [e.data for e in read_events(kafka, "deployment.updated")]
    assert [(d.version, d.status) for d in loads] == [("1", "loaded"), ("2", "loaded")]


def test_a_shadow_answers_copies_that_reach_the_log_and_never_a_caller(
    kafka, store, digits, versions
):
    rows = digits.x[:3]
    with running(kafka, store, max_wait_us=0) as srv:
        wait_version(srv, MODEL, "1")
        commands.promote(kafka, MODEL, "2", reason="compare", actor="tests", strategy="shadow")
        routed(srv, shadow=True)
        with srv.client() as client:
            ids = [f"shadowed-{i}" for i in range(60)]
            answered = {answer(client, rows, json={**body(rows), "id": i}) for i in ids}
        assert answered == {"1"}  # no answer of the candidate reached a caller

        def logged() -> list:
            found = [
                e.data for e in read_events(kafka, "inference.logged") if e.data.request_id in ids
            ]
            return found if len(found) == 2 * len(ids) else []

        records = wait_until(logged, "every request and its copy in inference.logged")
    shadows = [r for r in records if r.shadow]
    served = [r for r in records if not r.shadow]
    assert {r.version for r in shadows} == {"2"} and {r.version for r in served} == {"1"}
    assert sorted(r.request_id for r in shadows) == sorted(ids)
    assert all(r.ok and r.answered_by == "1" and r.agreement is not None for r in shadows)
    assert all(len(r.predictions) == 3 for r in shadows)
    by_id = {r.request_id: r for r in served}
    for r in shadows:  # agreement: the share of rows answered alike by both versions
        same = np.mean(np.asarray(r.predictions) == np.asarray(by_id[r.request_id].predictions))
        assert r.agreement == pytest.approx(same)


def test_bad_rollouts_are_refused_whole_and_change_no_weights(kafka, store, digits, versions):
    def refused(error: type[Exception], match: str, **kwargs) -> None:
        version = kwargs.pop("version", "2")
        with pytest.raises(error, match=match):
            commands.promote(kafka, MODEL, version, reason="bad", actor="tests", **kwargs)

    refused(InvalidRollout, "sum to 90, not 100", strategy="ab", weights={"1": 80, "2": 10})
    refused(InvalidRollout, "last step is 100", strategy="canary", steps=[10, 50])
    refused(InvalidRollout, "ascending", strategy="canary", steps=[50, 10, 100])
    refused(InvalidRollout, "takes no weight", strategy="shadow", weight=10)
    refused(InvalidRollout, "between 1 and 99", strategy="canary", weight=100)
    refused(RolloutConflict, "is the version serving now", strategy="shadow", version="1")
    refused(UnknownModel, "9", strategy="canary", weight=10, version="9")
    assert read_events(kafka, "model.traffic") == []

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(create_router(lambda: kafka))
    api = TestClient(app)
    r = api.post(
        f"/models/{MODEL}/promote",
        json={"version": "2", "reason": "r", "strategy": "ab", "weights": {"1": 60, "2": 60}},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidRollout"
    r = api.post(
        f"/models/{MODEL}/promote", json={"version": "1", "reason": "r", "strategy": "shadow"}
    )
    assert r.status_code == 409 and r.json()["error"]["type"] == "RolloutConflict"
    r = api.post(f"/models/{MODEL}/abort", json={"reason": "nothing to abort"})
    assert r.status_code == 409
    assert api.get(f"/models/{MODEL}/traffic").status_code == 404

    with running(kafka, store, max_wait_us=0) as srv:
        wait_version(srv, MODEL, "1")
        started = api.post(
            f"/models/{MODEL}/promote",
            json={"version": "2", "reason": "r", "strategy": "ab", "weight": 30},
        )
        assert started.status_code == 201 and started.json()["weights"] == {"1": 70, "2": 30}
        routed(srv, 30)
        r = api.post(
            f"/models/{MODEL}/promote",
            json={"version": "2", "reason": "again", "strategy": "canary", "weight": 5},
        )
        assert r.status_code == 409 and "in progress" in r.json()["error"]["message"]
        with pytest.raises(RolloutConflict, match="in progress"):
            commands.promote(kafka, MODEL, "1", reason="plain", actor="tests")
        slot = srv.server.registry.find_slot(MODEL)
        assert slot.route.candidate_weight == 30 and slot.current.version == "1"
        candidate = slot.candidate
        # A replica started mid-rollout catches up with it: champion, candidate and split.
        with running(kafka, store, replica="late-replica") as late:
            routed(late, 30)
            assert late.server.registry.find_slot(MODEL).current.version == "1"
        assert api.get(f"/models/{MODEL}/traffic").json()["status"] == "started"

        # Promoting the candidate completes the experiment: the candidate becomes champion
        # (a swap of the loaded deployment), and downstream sees a normal model.promoted.
        done = commands.promote(kafka, MODEL, "2", reason="B wins", actor="tests")
        assert done.type == "model.promoted" and done.data.evidence["strategy"] == "ab"
        wait_version(srv, MODEL, "2")
        slot = srv.server.registry.find_slot(MODEL)
        assert slot.route is None and slot.candidate is None and slot.previous.version == "1"
        assert slot.current is candidate  # swapped in, not loaded again
    statuses = [e.data.status for e in read_events(kafka, "model.traffic")]
    assert statuses == ["started", "completed"]
    *_, promoted = read_events(kafka, "model.promoted")
    assert (promoted.data.version, promoted.data.previous_version) == ("2", "1")
    loads = [(e.data.version, e.data.status) for e in read_events(kafka, "deployment.updated")]
    assert ("2", "failed") not in loads


def test_the_cli_starts_shows_and_aborts_a_rollout_and_refuses_bad_ones(kafka, versions, tmp_path):
    from tests.mlbus.test_cli import clean_env, mlbus, ok, one_line_error

    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        COLUMNS="250",
    )
    promote = ("models", "promote", MODEL, "2", "--reason", "try")
    one_line_error(mlbus(*promote, "--canary", "10", "--shadow", env=env), "one strategy")
    one_line_error(
        mlbus(*promote, "--ab", "50", "--weights", "1=60,2=30", env=env), "sum to 90, not 100"
    )
    one_line_error(
        mlbus("models", "promote", MODEL, "1", "--shadow", "--reason", "r", env=env),
        "serving now",
    )
    assert read_events(kafka, "model.traffic") == []
    started = ok(mlbus(*promote, "--steps", "5,50,100", "--min-samples", "300", env=env))
    assert "canary rollout of digits 2 against 1" in started.stdout
    (event,) = read_events(kafka, "model.traffic")
    assert (event.data.weights, event.data.steps) == ({"1": 95, "2": 5}, [5, 50, 100])
    assert event.data.criteria.min_samples == 300 and event.data.actor.startswith("user:")
    one_line_error(mlbus(*promote, "--ab", "20", env=env), "in progress")
    shown = ok(mlbus("models", "traffic", MODEL, "--json", env=env))
    assert '"status": "started"' in shown.stdout
    ok(mlbus("models", "abort", MODEL, "--reason", "enough", env=env))
    assert [e.data.status for e in read_events(kafka, "model.traffic")] == ["started", "aborted"]
