"""The workflow service on the bus with hand-made events: triggers (tags, debounce, sweeps,
versions older than the pipeline), the policy (thresholds, champion, sweeps, runs no
pipeline governs), rollback and its flapping guard, manual decisions, and restarts that
decide nothing twice."""

from __future__ import annotations

from datetime import UTC, datetime

from mlbus.consumers.workflow import commands
from mlbus.consumers.workflow.state import decision_id, read_state
from mlbus.settings import LimitsSettings
from tests.consumers.workflow.support import (
    alert,
    at_least,
    catch_up,
    completed,
    decisions,
    define,
    failed,
    pipeline_text,
    running,
    send,
    validated,
)
from tests.mlbus.kafka.support import read_events, wait_until


def test_a_validated_version_with_matching_tags_requests_training(kafka, group):
    send(kafka, validated("iris", "v0"))  # before the pipeline existed: never triggers it
    define(kafka, pipeline_text(extra="tags: {team: vision}\n"))
    refs = send(
        kafka,
        validated("iris", "v1", team="vision"),
        validated("iris", "v2"),
        validated("wine", "v1", team="vision"),
    )
    catch_up(kafka, group)
    (request,) = read_events(kafka, "training.requested")
    assert request.causationid == refs[0].id and request.correlationid == refs[0].correlationid
    data = request.data
    assert (data.model, data.family, data.pipeline) == ("m1", "mlp", "p1")
    assert data.dataset.version == "v1" and data.hyperparameters == {"hidden": 32}

    catch_up(kafka, group + "-fresh")  # every record again, from the beginning
    assert len(read_events(kafka, "training.requested")) == 1


def test_versions_within_the_debounce_window_train_once_on_the_newest(kafka, group):
    define(kafka, pipeline_text(debounce=1.0))
    with running(kafka, group):
        refs = send(
            kafka, validated("iris", "v1"), validated("iris", "v2"), validated("iris", "v3")
        )
        (request,) = wait_until(lambda: read_events(kafka, "training.requested"), "a request")
    assert request.data.dataset.version == "v3" and request.causationid == refs[2].id
    catch_up(kafka, group)  # a restart: the window is closed and the trigger in the log
    assert len(read_events(kafka, "training.requested")) == 1


def test_a_sweep_is_decided_once_every_run_finished_on_its_best_run(kafka, group):
    define(kafka, pipeline_text(extra="sweep: {hidden: [16, 32], lr: [0.001, 0.01]}\n"))
    (cause,) = send(kafka, validated("iris", "v1"))
    catch_up(kafka, group)
    requests = read_events(kafka, "training.requested")
    assert len(requests) == 4 and {r.correlationid for r in requests} == {cause.correlationid}
    assert sorted(r.data.sweep.index for r in requests) == [0, 1, 2, 3]
    assert len({r.data.sweep.sweep_id for r in requests}) == 1
    assert {(r.data.hyperparameters["hidden"], r.data.hyperparameters["lr"]) for r in requests} == {
        (16, 0.001),
        (16, 0.01),
        (32, 0.001),
        (32, 0.01),
    }
    by_index = {r.data.sweep.index: r for r in requests}

    scores = {0: 0.93, 1: 0.97, 2: 0.95}
    runs = [completed("m1", f"s{i}", scores[i], request_id=by_index[i].id) for i in scores]
    send(kafka, *runs)
    catch_up(kafka, group)
    assert decisions(kafka) == {"model.promoted": [], "model.rejected": []}  # one run to go

    send(kafka, failed("m1", by_index[3].id))
    catch_up(kafka, group)
    (promoted,) = read_events(kafka, "model.promoted")
    rejected = read_events(kafka, "model.rejected")
    assert promoted.data.version == "s1" and promoted.data.evidence["sweep_runs"] == 3
    assert sorted(r.data.version for r in rejected) == ["s0", "s2"]
    assert all("not the best run of its sweep" in r.data.reason for r in rejected)


def test_thresholds_then_the_champion_decide_with_policy_and_evidence(kafka, group):
    define(kafka, pipeline_text())
    refs = send(
        kafka,
        completed("m1", "a", 0.95),
        completed("m1", "slow", 0.99, latency=80),
        completed("m1", "b", 0.955),
        completed("m1", "c", 0.97),
    )
    catch_up(kafka, group)
    promoted = {e.data.version: e for e in read_events(kafka, "model.promoted")}
    rejected = {e.data.version: e.data for e in read_events(kafka, "model.rejected")}
    assert set(promoted) == {"a", "c"} and set(rejected) == {"slow", "b"}
    a, c = promoted["a"], promoted["c"]
    assert a.id == decision_id(refs[0].id) and a.causationid == refs[0].id
    assert (a.data.policy.name, a.data.policy.version) == ("p1-policy", 2)
    assert a.data.artifact.uri.endswith("m1/a/model.safetensors")
    assert a.data.dataset.version == "v1" and a.data.previous_version is None
    assert rejected["slow"].reason == ("threshold inference.latency_p95_ms <= 20 not met (80)")
    assert rejected["b"].champion_version == "a" and "margin 0.01" in rejected["b"].reason
    assert c.data.previous_version == "a"
    champion = c.data.evidence["champion"]
    assert champion["version"] == "a" and champion["test.accuracy"] == 0.95
    assert champion["evaluation"].startswith("recorded")
    assert {t["metric"]: t["passed"] for t in c.data.evidence["thresholds"]} == {
        "test.accuracy": True,
        "inference.latency_p95_ms": True,
    }


def test_a_run_on_other_data_is_not_compared_without_an_evaluator(kafka, group):
    define(kafka, pipeline_text())
    send(kafka, completed("m1", "a", 0.95), completed("m1", "b", 0.99, dataset_version="v2"))
    catch_up(kafka, group)
    (rejected,) = read_events(kafka, "model.rejected")
    assert "cannot compare with champion a" in rejected.data.reason
    assert "no evaluator" in rejected.data.reason


def test_a_run_no_pipeline_governs_is_recorded_and_not_promoted(kafka, group):
    define(kafka, pipeline_text())
    send(kafka, completed("orphan", "x1", 0.99))
    catch_up(kafka, group)
    assert decisions(kafka) == {"model.promoted": [], "model.rejected": []}
    (model,) = read_state(kafka).models.values()
    assert model.name == "orphan" and model.champion is None
    assert list(model.runs) == ["x1"] and not model.rejected


def test_an_alert_rolls_back_once_per_interval_and_a_restart_adds_nothing(kafka, group):
    define(kafka, pipeline_text())
    send(kafka, completed("m1", "a", 0.95), completed("m1", "b", 0.97), completed("m1", "c", 0.99))
    catch_up(kafka, group)
    assert [e.data.version for e in read_events(kafka, "model.promoted")] == ["a", "b", "c"]

    send(kafka, alert("m1", "b"))  # not the champion: nothing to do
    send(kafka, alert("m1", "c", status="resolved"))
    (cause,) = send(kafka, alert("m1", "c"))
    catch_up(kafka, group)
    *_, rollback = read_events(kafka, "model.promoted")
    data = rollback.data
    assert (data.version, data.previous_version, data.reason) == ("b", "c", "rollback")
    assert data.rollback and data.cause == cause.id and rollback.causationid == cause.id
    assert data.artifact.uri.endswith("m1/b/model.safetensors")
    assert data.evidence["alert"]["alert"] == "error_rate"

    send(kafka, alert("m1", "b"))  # b fails too, but within the interval: flapping guard
    catch_up(kafka, group + "-fresh")  # and a restart that reads every record again
    assert [e.data.version for e in read_events(kafka, "model.promoted")] == ["a", "b", "c", "b"]
    assert read_state(kafka).models["m1"].champion.data.version == "b"


def test_after_a_rollback_the_next_one_skips_versions_rolled_back_from(kafka, group):
    define(kafka, pipeline_text(interval=0))

    with running(kafka, group):
        send(
            kafka,
            completed("m1", "a", 0.95),
            completed("m1", "b", 0.97),
            completed("m1", "c", 0.99),
        )
        at_least(kafka, "model.promoted", 3)
        send(kafka, alert("m1", "c"))
        at_least(kafka, "model.promoted", 4)
        send(kafka, alert("m1", "b"))
        promoted = [e.data for e in at_least(kafka, "model.promoted", 5)]
    assert [(p.version, p.rollback) for p in promoted] == [
        ("a", False),
        ("b", False),
        ("c", False),
        ("b", True),
        ("a", True),
    ]


def test_manual_and_automatic_decisions_are_both_events_and_the_later_wins(kafka, group):
    define(kafka, pipeline_text())
    with running(kafka, group):
        send(kafka, completed("m1", "a", 0.95), completed("m1", "b", 0.93))
        wait_until(lambda: read_events(kafka, "model.rejected"), "b rejected")
        manual = commands.promote(kafka, "m1", "b", reason="hotfix for X", actor="user:ann")
        assert manual.data.evidence["overrides_rejection"].startswith("does not beat champion a")
        send(kafka, completed("m1", "c", 0.99))  # the policy compares c with b: promoted
        promoted = [e.data for e in at_least(kafka, "model.promoted", 3)]
    assert [(p.version, p.actor) for p in promoted] == [
        ("a", "mlbus/workflow"),
        ("b", "user:ann"),
        ("c", "mlbus/workflow"),
    ]
    assert promoted[2].previous_version == "b"
    back = commands.rollback(kafka, "m1", to=None, reason="c misbehaves", actor="user:bob")
    assert (back.data.version, back.data.rollback, back.data.actor) == ("b", True, "user:bob")
    assert back.data.artifact.uri.endswith("m1/b/model.safetensors")
    model = read_state(kafka).models["m1"]
    assert (model.champion.data.version, model.champion.data.actor) == ("b", "user:bob")
    assert model.rolled_back() == {"c"} and model.previous_good().data.version == "a"


def test_a_sweep_over_the_cap_in_the_log_requests_nothing(kafka, group, caplog):
    """`apply` refuses such a file; the service holds the same line against a revision that
    reached the log by other means (here: applied under a larger cap)."""
    define(kafka, pipeline_text(extra="sweep: {hidden: [16, 32], dropout: [0.0, 0.2, 0.4]}\n"))
    define(
        kafka, pipeline_text("p2", dataset="wine", model="m2", extra="sweep: {hidden: [16, 32]}\n")
    )
    send(kafka, validated("iris", "v1"), validated("wine", "v1"))
    catch_up(kafka, group, limits=LimitsSettings(max_sweep_runs=5))
    requests = read_events(kafka, "training.requested")
    assert sorted((r.data.pipeline, r.data.sweep.index) for r in requests) == [
        ("p2", 0),
        ("p2", 1),
    ]
    assert "p1 revision 1 sweeps 6 runs, over the limit of 5" in caplog.text


def test_no_rollback_without_a_named_rule_evidence_or_for_drift_then_one_with_them(kafka, group):
    define(kafka, pipeline_text())
    send(kafka, completed("m1", "a", 0.95), completed("m1", "b", 0.97))
    catch_up(kafka, group)
    drift = alert("m1", "b", name="psi").model_copy(update={"metric": "psi.f0", "rollback": False})
    latency = alert("m1", "b", name="latency_p99")  # not named in the pipeline's rollback
    unproven = alert("m1", "b", others={"a": (110, 600)})  # a did as badly
    stale = alert("m1", "b").model_copy(update={"window_end": datetime(2020, 1, 1, tzinfo=UTC)})
    send(kafka, drift, latency, unproven, stale)
    catch_up(kafka, group)
    assert [e.data.version for e in read_events(kafka, "model.promoted")] == ["a", "b"]
    (cause,) = send(kafka, alert("m1", "b"))
    catch_up(kafka, group)
    *_, back = read_events(kafka, "model.promoted")
    assert back.data.rollback and back.data.cause == cause.id
    comparison = back.data.evidence["comparison"]
    assert comparison["better"] is True and comparison["previous"]["version"] == "a"
