"""A 12-trial TPE search with median pruning on digits, run by `mlbus run tuning` that is
SIGKILLed in the middle and restarted, with real training workers and the workflow service:
the log ends with exactly 12 trial outcomes, no trial requested or trained twice, every
pruned trial stopped at the epoch its outcome names (and no earlier than the decision), and
the best trial promoted through the pipeline's policy."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from contextlib import ExitStack, closing
from pathlib import Path

import pytest

from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.samples import sample_table
from mlbus.datasets.sources import from_table
from mlbus.datasets.validator import Validator
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import decode
from mlbus.schemas.training import PRUNED
from mlbus.search import trial_request_id
from mlbus.storage import ObjectStore
from mlbus.trainer.worker import TrainingWorker
from tests.consumers.workflow.support import at_least, define, running
from tests.mlbus.kafka.support import LoopThread, read_events, read_raw, wait_until
from tests.mlbus.test_cli import MLBUS, clean_env

pytestmark = pytest.mark.integration

TRIALS = 12
EPOCHS = 6

SPACE = """\
lr: {type: float, low: 1.0e-5, high: 3.0e-1, log: true}
hidden: {type: int, low: 8, high: 96}
dropout: {type: categorical, choices: [0.0, 0.1, 0.3]}
"""

# Never triggered by a dataset (no such dataset): it governs the search's trials only.
PIPELINE = """\
name: tune-digits
dataset: no-such-dataset
model: digits
family: mlp
policy:
  name: search-best
  metric: validation.accuracy
  thresholds:
    - {metric: validation.accuracy, op: ">=", value: 0.5}
"""


def outcomes(kafka: KafkaConfig, runs: set[str]) -> list:
    """The final outcomes of the search's runs (a retryable failure is a notice)."""
    done = [e for e in read_events(kafka, "training.completed") if e.data.run_id in runs]
    failed = [
        e
        for e in read_events(kafka, "training.failed")
        if e.data.run_id in runs and not e.data.retryable
    ]
    return done + failed


@pytest.mark.timeout(900)  # twelve real trainings on a machine that may be shared
def test_search_survives_a_sigkill_of_the_tuning_service(
    kafka: KafkaConfig, group: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    store = ObjectStore((data / "objects").resolve().as_uri())
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(data),
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
        MLBUS_KAFKA__SESSION_TIMEOUT_MS="2000",
        MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS="500",
    )
    define(kafka, PIPELINE)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    log_path = tmp_path / "tuning.log"
    processes: list[subprocess.Popen[bytes]] = []

    def start_tuning() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                [MLBUS, "run", "tuning"], env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(process)
        return process

    with ExitStack() as stack:
        stack.callback(lambda: [p.kill() or p.wait() for p in processes if p.poll() is None])
        producer = stack.enter_context(EventProducer(kafka, source="test/trainer"))
        validator_out = stack.enter_context(EventProducer(kafka, source="test/validator"))
        for n in range(2):  # two workers share the trials
            worker = stack.enter_context(closing(TrainingWorker(kafka, store, producer)))
            loop = ConsumerLoop(
                kafka, group=group + "-trainer", name=f"trainer-{n}", long_running=True,
                handlers={"training.requested": worker},
            )  # fmt: skip
            stack.enter_context(LoopThread(loop))
        validator = ConsumerLoop(
            kafka, group=group + "-validator", name="validator",
            handlers={"dataset.created": Validator(store, validator_out)},
        )  # fmt: skip
        stack.enter_context(LoopThread(validator))
        stack.enter_context(running(kafka, group + "-workflow"))
        with DatasetRegistry(store, kafka) as registry:
            dataset = registry.register(
                from_table(sample_table("digits")), name="digits", label="label"
            )

        tuning = start_tuning()
        # `mlbus tune --wait --json` publishes the search and follows it to its end.
        tune = subprocess.Popen(
            [
                MLBUS, "tune", "digits", "--dataset", f"digits@{dataset.version}", "--family",
                "mlp", "--space", str(space), "--trials", str(TRIALS), "--parallel", "2",
                "--pruner", "median", "--sampler", "tpe", "--epochs", str(EPOCHS),
                "--pipeline", "tune-digits", "--wait", "--json",
            ],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        processes.append(tune)
        (search,) = wait_until(
            lambda: read_events(kafka, "search.requested"), "the search on the log", timeout=60
        )
        search_id = search.data.search_id
        expected = {trial_request_id(search_id, n) for n in range(TRIALS)}

        def requested_trials() -> list:
            return [e for e in read_events(kafka, "training.requested") if e.id in expected]

        def finished() -> int:
            runs = {e.data.run_id for e in read_events(kafka, "training.started")}
            return len(outcomes(kafka, runs))

        # Killed once a few trials are over (the search has a model by then) and others run.
        wait_until(
            lambda: finished() >= 4,
            lambda: "4 trial outcomes; the tuning log:\n" + log_path.read_text()[-3000:],
            timeout=300,
            interval=0.5,
        )
        tuning.send_signal(signal.SIGKILL)
        tuning.wait(10)
        killed_at = len(requested_trials())
        assert killed_at < TRIALS, "the kill came after the search had requested everything"
        time.sleep(1.0)  # trials go on finishing while no tuning service runs
        final = start_tuning()

        wait_until(
            lambda: finished() >= TRIALS,
            lambda: f"{TRIALS} outcomes; the tuning log:\n" + log_path.read_text()[-3000:],
            timeout=600,
            interval=1.0,
        )
        (promoted,) = at_least(kafka, "model.promoted", 1, timeout=60)
        stdout, stderr = tune.communicate(timeout=120)
        assert tune.returncode == 0, stderr.decode()[-3000:]
        time.sleep(1.0)  # anything published twice would be on the log by now
        final.send_signal(signal.SIGTERM)
        assert final.wait(30) == 0, log_path.read_text()[-3000:]

    requests = requested_trials()
    assert sorted(e.data.trial.number for e in requests) == list(range(TRIALS))
    # Each trial's record is keyed by its own request id (not the model): the trials spread
    # over the topic's partitions, so that both workers of the group get some.
    records = {
        decode(m.value(), m.headers()).id: m
        for m in read_raw(kafka, kafka.topic("training.requested"))
    }
    trial_records = [records[e.id] for e in requests]
    assert [m.key().decode() for m in trial_records] == [e.id for e in requests]
    assert len({m.partition() for m in trial_records}) > 1, "every trial on one partition"
    assert len(requests) == len({e.id for e in requests}) == TRIALS, "a trial requested twice"
    runs = {e.data.run_id for e in read_events(kafka, "training.started")}
    started = Counter(
        e.data.run_id for e in read_events(kafka, "training.started") if e.data.run_id in runs
    )
    assert len(started) == TRIALS and set(started.values()) == {1}, "a trial trained twice"
    final_outcomes = outcomes(kafka, runs)
    assert len(final_outcomes) == TRIALS
    assert len({e.data.run_id for e in final_outcomes}) == TRIALS

    progress = Counter(e.data.run_id for e in read_events(kafka, "training.progress"))
    decisions = {e.data.run_id: e.data for e in read_events(kafka, "search.pruned")}
    pruned = [e.data for e in final_outcomes if e.type == "training.failed"]
    assert pruned, "median pruning stopped no trial of 12"
    for p in pruned:
        assert p.pruned and p.error_type == PRUNED and p.epoch is not None
        assert progress[p.run_id] == p.epoch < EPOCHS, "stopped at another epoch than it says"
        assert decisions[p.run_id].epoch <= p.epoch
    completed = [e.data for e in final_outcomes if e.type == "training.completed"]
    assert all(progress[c.run_id] == EPOCHS for c in completed)

    best = max(c.metrics["validation"]["accuracy"] for c in completed)
    followed = json.loads(stdout)  # what `mlbus tune --wait --json` saw at the end
    assert followed["search_id"] == search_id and followed["finished"]
    assert followed["counts"] == {
        "requested": TRIALS, "running": 0, "completed": len(completed),
        "pruned": len(pruned), "failed": 0,
    }  # fmt: skip
    assert followed["best"]["value"] == best
    assert promoted.data.evidence["sweep_runs"] == len(completed)
    winner = next(c for c in completed if c.run_id == promoted.data.run_id)
    assert winner.metrics["validation"]["accuracy"] == best
    assert promoted.data.policy.name == "search-best"
    rejected = {e.data.run_id for e in read_events(kafka, "model.rejected")}
    assert rejected == {c.run_id for c in completed} - {winner.run_id}
