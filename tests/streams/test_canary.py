"""A canary decided end to end on the real broker: `mlbus streams` windows the inference log a
replica publishes while it splits traffic 90/10, and the workflow steps the canary on those
windows — only once the candidate has its minimum samples — then promotes it; a replay of
the log (the first traffic event and the windows) gives the same decisions."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

from mlbus.consumers.workflow import rollout as rollouts
from mlbus.consumers.workflow.state import ACTOR
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.serving import InferenceLogged
from tests.consumers.workflow.support import completed, define, pipeline_text, running
from tests.mlbus.kafka.support import read_events, wait_until
from tests.streams.test_streams import started

CANARY = """\
rollout:
  strategy: canary
  steps: [10, 100]
  min_samples: 100
"""
PER_WINDOW = 300  # requests per 1 s window, 10% of them answered by the candidate


def logged(rid: str, version: str, *, ok: bool = True, status: int | None = None):
    return InferenceLogged(
        request_id=rid,
        model="m1",
        version=version,
        replica="rep-1",
        latency_seconds=0.002,
        ok=ok,
        status=status,
        predictions=["0"] if ok else [],
    )


def test_streams_windows_step_a_canary_after_its_minimum_samples(
    kafka, group, run_streams, streams_env
):
    define(kafka, pipeline_text(extra=CANARY))
    with running(kafka, group):
        app = run_streams("--app-id", kafka.topic_prefix + "streams", "--idle-seconds", "3")
        started(app)
        with EventProducer(kafka, source="tests") as producer:
            producer.publish(completed("m1", "a", 0.95))
            producer.flush()
        wait_until(lambda: read_events(kafka, "model.promoted"), "a promoted")
        with EventProducer(kafka, source="tests") as producer:
            producer.publish(completed("m1", "b", 0.97))
            producer.flush()
        (begun,) = wait_until(lambda: read_events(kafka, "model.traffic"), "the canary")
        assert begun.data.weights == {"a": 90, "b": 10}

        # Dated ahead of the clock, as in test_rollback: windows close on stream time.
        start = (math.floor(max(begun.time.timestamp(), time.time())) + 60) * 1000
        n = 0
        with EventProducer(kafka, source="mlbus/serving") as producer:
            for w in range(6):  # 30 candidate samples a window: the 4th window reaches 100
                for i in range(PER_WINDOW):
                    n += 1
                    at = datetime.fromtimestamp((start + w * 1000 + i * 3) / 1000, UTC)
                    version = "b" if i % 10 == 0 else "a"
                    producer.publish(logged(f"r{n}", version), time=at)
                for i in range(20):  # a client's garbage: refused, counted apart
                    n += 1
                    at = datetime.fromtimestamp((start + w * 1000 + 950 + i) / 1000, UTC)
                    producer.publish(logged(f"g{n}", "b", ok=False, status=400), time=at)
            last = datetime.fromtimestamp((start + 9000) / 1000, UTC)
            producer.publish(logged("tail", "a"), time=last)  # moves stream time past them
            producer.flush()

        def promoted_b() -> bool:
            return any(e.data.version == "b" for e in read_events(kafka, "model.promoted"))

        wait_until(promoted_b, lambda: f"b promoted\n{app.log()}", timeout=120)
        assert app.stop() == 0, app.log()

    events = read_events(kafka, "model.traffic")
    assert [e.data.status for e in events] == ["started", "completed"]
    analysis = events[1].data.analysis
    figures = analysis["versions"]["b"]
    # Decided on the window that took the candidate to its 100 samples, not before.
    assert (figures["windows"], figures["served"], figures["client_errors"]) == (4, 120, 80)
    assert analysis["versions"]["a"]["served"] in (3 * 270, 4 * 270)  # emission order
    *_, promoted = read_events(kafka, "model.promoted")
    assert (promoted.data.version, promoted.data.evidence["rollout"]) == (
        "b",
        begun.data.rollout_id,
    )
    windows = rollouts.merge(
        read_events(kafka, "serving.metrics"), read_events(kafka, "serving.accuracy")
    )
    replayed = rollouts.replay(begun, windows, ACTOR)
    assert [t.model_dump() for t in replayed] == [events[1].data.model_dump()]
