"""The whole loop with real parts: `mlbus pipelines apply infra/pipelines/digits.yaml`, the
digits sample registered and validated, a real training worker, and the workflow service:
dataset.created → dataset.validated → training.requested → training.completed →
model.promoted (policy, evidence); a worse run is rejected; a manual promotion overrides
it; a serving alert rolls back to the previous version; restarts decide nothing twice."""

from __future__ import annotations

import json
from contextlib import closing

import pytest

from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.samples import sample_table
from mlbus.datasets.sources import from_table
from mlbus.datasets.validator import Validator
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker
from tests.consumers.workflow.support import (
    DIGITS_YAML,
    alert,
    at_least,
    catch_up,
    running,
    send,
)
from tests.mlbus.kafka.support import LoopThread, read_events, read_raw
from tests.mlbus.test_cli import clean_env, mlbus, ok

pytestmark = pytest.mark.integration

DECISIONS = ("training.requested", "model.promoted", "model.rejected")


def test_digits_pipeline_from_registration_to_rollback(kafka, group, tmp_path):
    store = ObjectStore(tmp_path.joinpath("objects").as_uri())
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
        COLUMNS="250",
    )
    applied = ok(mlbus("pipelines", "apply", str(DIGITS_YAML), "--actor", "user:ci", env=env))
    assert "pipeline digits defined: revision 1" in applied.stdout

    with (
        EventProducer(kafka, source="test/trainer") as trainer_out,
        EventProducer(kafka, source="test/validator") as validator_out,
    ):
        worker = TrainingWorker(kafka, store, trainer_out)
        trainer = ConsumerLoop(
            kafka,
            group=group + "-trainer",
            name="trainer",
            long_running=True,
            handlers={"training.requested": worker},
        )
        validate = Validator(store, validator_out)
        validator = ConsumerLoop(
            kafka,
            group=group + "-validator",
            name="validator",
            handlers={"dataset.created": validate},
        )
        with closing(worker), LoopThread(trainer), LoopThread(validator), running(kafka, group):
            with DatasetRegistry(store, kafka) as registry:
                dataset = registry.register(
                    from_table(sample_table("digits")), name="digits", label="label"
                )
            (promoted,) = at_least(kafka, "model.promoted", 1, timeout=300)  # contended CI

            (created,) = read_events(kafka, "dataset.created")
            (checked,) = read_events(kafka, "dataset.validated")
            (request,) = read_events(kafka, "training.requested")
            (done,) = read_events(kafka, "training.completed")
            assert checked.causationid == created.id and request.causationid == checked.id
            assert done.causationid == request.id and promoted.causationid == done.id
            assert {
                checked.correlationid,
                request.correlationid,
                done.correlationid,
                promoted.correlationid,
            } == {created.correlationid}
            assert request.data.pipeline == "digits" and request.data.family == "cnn"
            assert request.data.dataset.version == dataset.version

            a = promoted.data
            assert (a.policy.name, a.policy.version, a.actor) == (
                "digits-accuracy",
                1,
                "mlbus/workflow",
            )
            assert a.version == done.data.version and a.artifact == done.data.artifact
            assert a.dataset.version == dataset.version and a.cause == done.id
            assert a.evidence["champion"] is None and a.evidence["pipeline_revision"] == 1
            bars = {t["metric"]: t for t in a.evidence["thresholds"]}
            assert bars["test.accuracy"]["passed"] and bars["test.accuracy"]["actual"] >= 0.95
            assert bars["inference.latency_p95_ms"]["passed"]

            # A worse run on the same data: rejected against the champion.
            accuracy = done.data.metrics["test"]["accuracy"]
            worse_metrics = done.data.metrics | {
                "test": done.data.metrics["test"] | {"accuracy": accuracy - 0.001}
            }
            worse = done.data.model_copy(
                update={
                    "run_id": "worse-run",
                    "version": "worse-run",
                    "request_id": "by-hand",
                    "metrics": worse_metrics,
                }
            )
            send(kafka, worse)
            (rejected,) = at_least(kafka, "model.rejected", 1)
            assert (
                rejected.data.version == "worse-run" and rejected.data.champion_version == a.version
            )
            assert rejected.data.policy.name == "digits-accuracy"

            # An operator overrides the policy; then serving alerts on that version.
            ok(
                mlbus(
                    "models",
                    "promote",
                    "digits",
                    "worse-run",
                    "--reason",
                    "canary test",
                    "--actor",
                    "user:ann",
                    env=env,
                )
            )
            manual = at_least(kafka, "model.promoted", 2)[-1].data
            assert (manual.version, manual.actor, manual.previous_version) == (
                "worse-run",
                "user:ann",
                a.version,
            )
            (fired,) = send(kafka, alert("digits", "worse-run", others={a.version: (2, 1000)}))
            rollback = at_least(kafka, "model.promoted", 3)[-1]
            assert rollback.causationid == fired.id and rollback.data.rollback
            back = rollback.data
            assert (back.version, back.previous_version, back.reason) == (
                a.version,
                "worse-run",
                "rollback",
            )
            assert rollback.data.artifact == done.data.artifact

    counts = {t: len(read_raw(kafka, kafka.topic(t))) for t in DECISIONS}
    assert counts == {"training.requested": 1, "model.promoted": 3, "model.rejected": 1}
    catch_up(kafka, group)  # restart: the same group
    catch_up(kafka, group + "-new")  # restart with lost offsets: every record again
    assert {t: len(read_raw(kafka, kafka.topic(t))) for t in DECISIONS} == counts

    # The listing is the lineage store's: project the log into it first (`mlbus up` would).
    ok(mlbus("lineage", "project", "--stop-at-end", "--group", group + "-lineage", env=env))
    listed = json.loads(ok(mlbus("models", "list", "--json", env=env)).stdout)
    (model,) = listed
    assert model["model"] == "digits" and model["champion"]["version"] == a.version
    assert {v["version"]: v["status"] for v in model["versions"]} == {
        a.version: "champion",
        "worse-run": "rolled back",
    }
