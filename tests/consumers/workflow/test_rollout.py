"""Canary rollouts decided by the workflow from the streams' per-version windows, against the
real broker: a pipeline with a `rollout:` plan starts a canary instead of promoting at once;
a step advances only once the candidate has its minimum samples, aborts on a worse error
ratio (client errors are not errors), and the last step ends in a `model.promoted` of the
candidate with the rollout's evidence; a replay of the log decides the same."""

from __future__ import annotations

from datetime import timedelta

from mlbus.consumers.workflow import rollout as rollouts
from mlbus.consumers.workflow.state import ACTOR
from mlbus.schemas.models import DeploymentUpdated
from mlbus.schemas.serving import Quantiles, ServingAccuracy, ServingMetrics
from tests.consumers.workflow.support import (
    catch_up,
    completed,
    define,
    pipeline_text,
    send,
)
from tests.mlbus.kafka.support import read_events

CANARY = """\
rollout:
  strategy: canary
  steps: [10, 50, 100]
  min_samples: 100
"""


def window(
    version: str,
    start,
    requests: int,
    *,
    errors: int = 0,
    client_errors: int = 0,
    p99: float = 0.01,
    seconds: int = 10,
) -> ServingMetrics:
    served = requests - client_errors
    return ServingMetrics(
        model="m1",
        version=version,
        window_start=start,
        window_end=start + timedelta(seconds=seconds),
        requests=requests,
        errors=errors,
        client_errors=client_errors,
        error_rate=errors / served if served else 0.0,
        latency_seconds=Quantiles(p50=p99 / 2, p95=p99 * 0.9, p99=p99, mean=p99 / 2, max=p99),
    )


def started(kafka, group):
    """A pipeline with a canary plan, champion a, and a better b: the canary of b started."""
    define(kafka, pipeline_text(extra=CANARY))
    send(kafka, completed("m1", "a", 0.95))
    catch_up(kafka, group)
    send(kafka, completed("m1", "b", 0.97))
    catch_up(kafka, group)
    (promoted,) = read_events(kafka, "model.promoted")  # a, at once: there was no champion
    assert promoted.data.version == "a"
    (event,) = read_events(kafka, "model.traffic")
    return event


def traffic(kafka):
    return [e.data for e in read_events(kafka, "model.traffic")]


def test_a_canary_steps_after_its_minimum_samples_and_ends_in_a_promotion(kafka, group):
    event = started(kafka, group)
    begun = event.data
    assert (begun.strategy, begun.status, begun.stable, begun.candidate) == (
        "canary",
        "started",
        "a",
        "b",
    )
    assert begun.weights == {"a": 90, "b": 10} and begun.steps == [10, 50, 100]
    assert begun.criteria.min_samples == 100 and begun.actor == ACTOR
    assert begun.analysis["policy"]["comparison"]["candidate"] == "0.97"
    t0 = event.time
    before = window("b", t0 - timedelta(seconds=5), 500)  # began before the step: not counted
    send(kafka, before, window("a", t0, 180), window("b", t0, 20))
    for k in range(1, 4):  # 80 candidate samples of the 100 needed (client errors not counted)
        at = t0 + timedelta(seconds=10 * k)
        send(kafka, window("a", at, 180), window("b", at, 30, client_errors=10))
    catch_up(kafka, group)
    assert [t.status for t in traffic(kafka)] == ["started"]  # waits for its samples

    at = t0 + timedelta(seconds=40)
    send(kafka, window("a", at, 180, errors=1), window("b", at, 20, errors=1))  # 100 reached
    catch_up(kafka, group)
    first, second = traffic(kafka)
    assert (second.status, second.step, second.weights) == ("advanced", 1, {"a": 50, "b": 50})
    analysis = second.analysis
    assert analysis["verdict"] == "advance" and analysis["versions"]["b"]["served"] == 100
    assert analysis["versions"]["b"]["client_errors"] == 30
    assert analysis["versions"]["a"]["requests"] == 900 and analysis["until"] == (
        (t0 + timedelta(seconds=50)).isoformat()
    )
    assert {c["metric"]: c["passed"] for c in analysis["checks"]} == {
        "error_ratio": True,
        "latency_p99": True,
        "accuracy": None,  # no labels: not a criterion of the step
    }
    assert second.rollout_id == first.rollout_id and second.actor == ACTOR

    # Step 2 counts the windows that began once step 1 was decided: 60 + 60 samples.
    for k in (5, 6):
        at = t0 + timedelta(seconds=10 * k)
        send(kafka, window("a", at, 60), window("b", at, 60))
    send(
        kafka,
        ServingAccuracy(
            model="m1",
            version="b",
            window_start=t0 + timedelta(seconds=50),
            window_end=t0 + timedelta(seconds=60),
            labelled=10,
            correct=9,
            accuracy=0.9,
        ),
    )
    catch_up(kafka, group)
    *_, done = traffic(kafka)
    assert (done.status, done.weights) == ("completed", {"b": 100})
    assert done.analysis["versions"]["b"]["served"] == 120
    assert done.analysis["versions"]["b"]["labelled"] == 10
    *_, promoted = read_events(kafka, "model.promoted")
    assert (promoted.data.version, promoted.data.previous_version) == ("b", "a")
    assert promoted.data.evidence["rollout"] == begun.rollout_id
    assert promoted.data.evidence["steps"] == [10, 50, 100]
    assert promoted.causationid == read_events(kafka, "model.traffic")[-1].id

    # Replaying the log decides the same, and a service reading it all again adds nothing.
    windows = rollouts.merge(
        read_events(kafka, "serving.metrics"), read_events(kafka, "serving.accuracy")
    )
    replayed = rollouts.replay(event, windows, ACTOR)
    assert [t.model_dump() for t in replayed] == [t.model_dump() for t in traffic(kafka)[1:]]
    catch_up(kafka, group + "-again")
    assert len(read_events(kafka, "model.traffic")) == 3
    assert len(read_events(kafka, "model.promoted")) == 2


def test_a_candidate_with_more_server_errors_is_aborted_with_the_evidence(kafka, group):
    event = started(kafka, group)
    t0 = event.time
    # Client errors of the stable version are not its errors; the candidate fails 20%.
    send(kafka, window("a", t0, 900, errors=1, client_errors=200), window("b", t0, 100, errors=20))
    catch_up(kafka, group)
    _, aborted = traffic(kafka)
    assert (aborted.status, aborted.weights) == ("aborted", {"a": 100})
    assert aborted.reason.startswith("step 1 failed: error ratio 20/100")
    (check,) = [c for c in aborted.analysis["checks"] if c["metric"] == "error_ratio"]
    assert check["passed"] is False and check["wilson"][0] > 0.05
    assert aborted.analysis["versions"]["a"]["served"] == 700
    assert [e.data.version for e in read_events(kafka, "model.promoted")] == ["a"]
    replayed = rollouts.replay(event, read_events(kafka, "serving.metrics"), ACTOR)
    assert [t.model_dump() for t in replayed] == [aborted.model_dump()]
    # A later window changes nothing: the rollout has ended.
    send(kafka, window("b", t0 + timedelta(seconds=10), 100))
    catch_up(kafka, group)
    assert len(traffic(kafka)) == 2


def test_a_restart_mid_step_counts_the_windows_already_in_the_log(kafka, group):
    event = started(kafka, group)
    t0 = event.time
    send(kafka, window("a", t0, 540), window("b", t0, 60))
    catch_up(kafka, group)  # 60 of 100: nothing yet; these offsets are committed
    assert len(traffic(kafka)) == 1
    at = t0 + timedelta(seconds=10)
    send(kafka, window("a", at, 360), window("b", at, 40))
    catch_up(kafka, group)  # a new process: the first window is counted again from the log
    _, advanced = traffic(kafka)
    assert advanced.status == "advanced" and advanced.analysis["versions"]["b"]["served"] == 100


def test_a_candidate_a_replica_cannot_load_aborts_the_rollout(kafka, group):
    event = started(kafka, group)
    failure = DeploymentUpdated(
        model="m1", version="b", replica="r1", status="failed", error="hash mismatch"
    )
    send(kafka, failure.model_copy(update={"version": "a"}), causation=event)  # not the candidate
    send(kafka, failure, causation=event)
    catch_up(kafka, group)
    _, aborted = traffic(kafka)
    assert (aborted.status, aborted.weights) == ("aborted", {"a": 100})
    assert aborted.reason == "b failed to load on replica r1: hash mismatch"
    assert aborted.analysis["deployment"]["replica"] == "r1"
