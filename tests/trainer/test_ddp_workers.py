"""Data parallel through the broker: two `mlbus trainer` processes train one `workers: 2`
run (rendezvous announced on `training.started`); its metrics are the 1-worker run's; a run
whose member is SIGKILLed finishes exactly once; more workers than can join fail clearly."""

from __future__ import annotations

import math
import signal
import time

import pytest

from mlbus.kafka.producer import EventProducer
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.training import TrainingRequested, run_id_for
from tests.mlbus.kafka.support import wait_until
from tests.mlbus.test_cli import env, json_lines, mlbus, ok  # noqa: F401 - env: a fixture
from tests.trainer.test_workers import Events, _worker_id, workers  # noqa: F401 - a fixture

# Real trainings and up to two rendezvous waits each, on a machine that may be shared.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

PARAMS = {"batch_size": 64, "hidden": 32, "dropout": 0.0}
# A member that has not trained yet loads torch before it joins: over 20 s on two cores
# shared with the other test workers (docs/distributed.md). So the first attempt's wait is
# the default's; a restart after a loss, and the refusal, wait all of it too.
TIMEOUTS = {
    "MLBUS_TRAINER__RENDEZVOUS_TIMEOUT_SECONDS": "60",
    "MLBUS_TRAINER__COLLECTIVE_TIMEOUT_SECONDS": "60",
}


def _request(dataset, workers_wanted, epochs, model):  # type: ignore[no-untyped-def]
    return TrainingRequested(
        model=model,
        family="mlp",
        dataset=dataset,
        seed=3,
        max_epochs=epochs,
        device="cpu",
        hyperparameters=PARAMS,
        workers=workers_wanted,
    )


def _start(kafka, workers):  # type: ignore[no-untyped-def]  # noqa: F811
    cli_env, start = workers
    sample = json_lines(ok(mlbus("datasets", "sample", "digits", "--json", env=cli_env)).stdout)[0]
    start("validator", "datasets", "validate")
    return DatasetRef(name="digits", version=sample["version"]), start


def _state(what, events, request, tmp_path):  # type: ignore[no-untyped-def]
    """What a failed wait shows: the run's events so far and the workers' output."""

    def describe() -> str:
        seen = [
            f"{e.type} {getattr(e.data, 'attempt', '')} {getattr(e.data, 'reason', '')}".strip()
            for e in events.of_request(request, run_id_for(request))
        ]
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
        )
        return f"{what}; the run's events: {seen}\n{logs}"

    return describe


def _stop_cleanly(process, log):  # type: ignore[no-untyped-def]
    """SIGTERM a worker that took part in a run: it exits with code 0, and gloo's threads,
    alive past the group's end, do not abort it on the way out."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert "terminate called" not in log.read_text()


def test_two_workers_train_one_run_like_one(kafka, workers, tmp_path):  # noqa: F811
    workers[0].update(TIMEOUTS)
    dataset, start = _start(kafka, workers)
    first, second = start("a"), start("b")
    events = Events(kafka)
    try:
        with EventProducer(kafka, source="test") as producer:
            single = producer.publish(_request(dataset, 1, 3, "ddp-one")).id
        wait_until(lambda: events.of("training.completed", {single}), "the 1-worker run", 240)
        with EventProducer(kafka, source="test") as producer:
            double = producer.publish(_request(dataset, 2, 3, "ddp-two")).id
            too_many = producer.publish(_request(dataset, 3, 1, "ddp-three")).id
        wait_until(
            lambda: (
                events.of("training.completed", {double})
                and events.of("training.failed", {too_many})
            ),
            "the 2-worker run and the refusal",
            300,
        )
        (one,) = events.of("training.completed", {single})
        (two,) = events.of("training.completed", {double})
        assert (one.data.world_size, two.data.world_size) == (1, 2)
        for split in ("train", "validation", "test"):
            scores = one.data.metrics[split]
            for key in ("loss", "accuracy"):
                assert math.isclose(scores[key], two.data.metrics[split][key], abs_tol=1e-4)
        (failed,) = events.of("training.failed", {too_many})
        assert not failed.data.retryable
        assert failed.data.error_type == "WorkersUnavailable"
        assert "needs 3 trainer workers" in failed.data.reason
        assert first.poll() is None and second.poll() is None
        _stop_cleanly(first, tmp_path / "a.log")
        _stop_cleanly(second, tmp_path / "b.log")
    finally:
        events.stop()


def _kill_mid_run(kafka, workers, tmp_path, model, victim):  # type: ignore[no-untyped-def]  # noqa: F811
    """A 2-worker run of 8 epochs whose `victim` ("host" or "member") is SIGKILLed after
    its first epoch: exactly one completion, by a later attempt that resumed from a
    checkpoint with one worker. Returns the surviving worker, its log and the last attempt."""
    workers[0].update(TIMEOUTS)
    dataset, start = _start(kafka, workers)
    first, second = start("a"), start("b")
    events = Events(kafka)
    try:
        with EventProducer(kafka, source="test") as producer:
            request = producer.publish(_request(dataset, 2, 8, model)).id
        (started,) = wait_until(
            lambda: events.of("training.started", {request}), "the run to start", 120
        )
        host = first if _worker_id(first)(started.data.worker) else second
        member = second if host is first else first
        wait_until(
            lambda: [
                e for e in events.of("training.progress") if e.data.run_id == started.data.run_id
            ],
            _state("a first epoch", events, request, tmp_path),
            240,
            interval=0.1,
        )
        killed, survivor = (host, member) if victim == "host" else (member, host)
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        wait_until(
            lambda: (
                events.of("training.completed", {request})
                or [e for e in events.of("training.failed") if not e.data.retryable]
            ),
            _state("the run to end", events, request, tmp_path),
            300,
        )
        time.sleep(3)  # room for a second completion, were one to come
        completed = events.of("training.completed", {request})
        assert len(completed) == 1
        assert not [e for e in events.of("training.failed", {request}) if not e.data.retryable]
        attempts = [e.data for e in events.of("training.started", {request})]
        assert attempts[-1].attempt >= 2 and attempts[-1].resumed_from_epoch is not None
        assert completed[0].data.world_size == 1 and completed[0].data.epochs == 8
        assert survivor.poll() is None
        log = tmp_path / ("a.log" if survivor is first else "b.log")
        return survivor, log, attempts[-1]
    finally:
        events.stop()


def test_member_killed_mid_run_finishes_once(kafka, workers, tmp_path):  # noqa: F811
    # The host's next collective fails; the request, redelivered to it, goes on alone.
    _kill_mid_run(kafka, workers, tmp_path, "ddp-kill", "member")


def test_host_killed_mid_run_finishes_once(kafka, workers, tmp_path):  # noqa: F811
    # Rank 0 holds the store and publishes the run's events: with it gone, its member's
    # collectives fail (the member goes back to idle) and the request, never committed, is
    # redelivered to the worker that remains, which hosts the run from the last checkpoint.
    member, log, last = _kill_mid_run(kafka, workers, tmp_path, "ddp-host-kill", "host")
    assert _worker_id(member)(last.worker)
    _stop_cleanly(member, log)
