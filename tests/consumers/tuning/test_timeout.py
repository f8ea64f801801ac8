"""A search whose wall-clock budget runs out before its trials budget: no trial is requested
after the deadline, the trial running then finishes, the search ends with one
`search.completed` (reason timeout, the trials it requested), and the workflow decides the
search on that trial (its best is promoted through the pipeline's policy), also when the
tuning service restarts afterwards."""

from __future__ import annotations

import threading
import time

import pytest

from mlbus.consumers.tuning.service import TuningService, completed_id
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.training import TrainingCompleted
from mlbus.search import trial_request_id, trial_run_id
from tests.consumers.workflow.support import (
    catch_up,
    decisions,
    define,
    pipeline_text,
    send,
    validated,
)
from tests.mlbus.kafka.support import read_events, wait_until

pytestmark = pytest.mark.integration

TIMEOUT = 3.0
SEARCH = f"""\
search:
  trials: 6
  parallel: 1
  timeout_seconds: {TIMEOUT}
  objective: {{metric: validation.accuracy, direction: max}}
  space:
    lr: {{type: float, low: 1.0e-4, high: 1.0e-1, log: true}}
"""


def running_service(kafka: KafkaConfig) -> tuple[TuningService, threading.Thread]:
    service = TuningService(kafka, poll=0.1)
    thread = threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})
    thread.start()
    return service, thread


def stop(service: TuningService, thread: threading.Thread) -> None:
    service.stop()
    thread.join(30)
    assert not thread.is_alive(), "the tuning service did not stop"


def test_a_search_out_of_time_ends_and_is_decided_on_the_trials_it_ran(
    kafka: KafkaConfig, group: str
) -> None:
    define(kafka, pipeline_text(extra=SEARCH))
    send(kafka, validated("iris", "v1"))
    catch_up(kafka, group)  # the pipeline starts its search
    (search,) = read_events(kafka, "search.requested")
    sid = search.data.search_id
    assert search.data.timeout_seconds == TIMEOUT

    service, thread = running_service(kafka)
    try:
        (first,) = wait_until(
            lambda: read_events(kafka, "training.requested"), "the first trial", timeout=60
        )
        assert first.id == trial_request_id(sid, 0)
        time.sleep(TIMEOUT + 0.5)  # the wall-clock budget runs out while trial 0 runs
        assert read_events(kafka, "search.completed") == []  # trial 0 has no outcome yet
        run = trial_run_id(sid, 0)
        done = {
            "run_id": run, "model": "m1", "version": run[:12], "request_id": first.id,
            "family": "mlp", "dataset": {"name": "iris", "version": "v1"},
            "artifact": {"uri": "file:///x", "sha256": "sha256:" + "ab" * 32},
            "metrics": {
                "validation": {"accuracy": 0.95}, "test": {"accuracy": 0.94},
                "inference": {"latency_p95_ms": 2.0},
            },
            "hyperparameters": first.data.hyperparameters, "epochs": 3,
            "code": {"package_version": "0"}, "duration_seconds": 1.0,
        }  # fmt: skip
        send(kafka, TrainingCompleted.model_validate(done))
        (ended,) = wait_until(
            lambda: read_events(kafka, "search.completed"), "the search's end", timeout=60
        )
    finally:
        stop(service, thread)
    assert ended.id == completed_id(sid)
    e = ended.data
    assert (e.reason, e.trials, e.budget, e.completed) == ("timeout", 1, 6, 1)
    assert (e.best_trial, e.best_run_id, e.best_value) == (0, run, 0.95)
    assert len(read_events(kafka, "training.requested")) == 1  # none after the deadline

    catch_up(kafka, group)  # the workflow: the search's sweep is one trial, decided
    promoted = decisions(kafka)["model.promoted"]
    assert [p.data.version for p in promoted] == [run[:12]]

    service, thread = running_service(kafka)  # a restart changes nothing
    try:
        wait_until(lambda: service.book.searches.get(sid), "the search rebuilt", timeout=60)
        time.sleep(1.0)
    finally:
        stop(service, thread)
    assert len(read_events(kafka, "search.completed")) == 1
    assert len(read_events(kafka, "training.requested")) == 1
    catch_up(kafka, group + "-again")  # a rebuilt workflow decides nothing twice
    assert len(decisions(kafka)["model.promoted"]) == 1
