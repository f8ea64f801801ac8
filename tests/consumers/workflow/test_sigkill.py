"""`mlbus run workflow` SIGKILLed while runs keep completing, then restarted: every
`training.completed` ends with exactly one decision (a `model.promoted` or `model.rejected`
with the id derived from it), nothing is published twice, and the decisions are the ones an
uninterrupted workflow makes on the same log."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from mlbus.consumers.workflow.state import decision_id
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.catalog import TOPICS
from mlbus.schemas.training import TrainingCompleted
from tests.conftest import unique
from tests.consumers.workflow.support import catch_up, completed, decisions, define, pipeline_text
from tests.mlbus.kafka.support import publish, read_events, wait_until
from tests.mlbus.test_cli import MLBUS, clean_env

pytestmark = pytest.mark.integration

#: Completions published at once before each kill: the workflow decides them one by one
#: (each confirmed before its cause's offset may be committed), so the kill lands mid-burst.
BURST = 240


def completions(rng: random.Random, first: int, n: int) -> list[TrainingCompleted]:
    """Runs of one model (one partition: their order is the log's) with random accuracies,
    so that some are promoted and most rejected."""
    return [
        completed("m1", f"r{i:04d}", round(rng.uniform(0.85, 1.0), 4))
        for i in range(first, first + n)
    ]


def decided(kafka: KafkaConfig) -> list:
    return [e for events in decisions(kafka).values() for e in events]


class Tail:
    """Ids of the decisions on the log so far, read with one plain consumer as they come
    (cheap enough to poll often)."""

    def __init__(self, kafka: KafkaConfig) -> None:
        self.consumer = Consumer(
            {"bootstrap.servers": kafka.bootstrap, "group.id": unique("tail-"),
             "enable.auto.commit": False, "fetch.wait.max.ms": 10}
        )  # fmt: skip
        self.consumer.assign(
            [
                TopicPartition(kafka.topic(t), p, OFFSET_BEGINNING)
                for t in ("model.promoted", "model.rejected")
                for p in range(TOPICS[t].partitions)
            ]
        )
        self.ids: set[str] = set()

    def count(self) -> int:
        for m in self.consumer.consume(1000, timeout=0.05):
            if m.error() is None:
                self.ids.add(json.loads(m.value())["id"])
        return len(self.ids)

    def close(self) -> None:
        self.consumer.close()


def test_sigkill_while_runs_complete_then_restart_decides_each_run_exactly_once(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    define(kafka, pipeline_text())
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        # the session broker is the embedded one: short group timeouts (docs/broker.md)
        MLBUS_KAFKA__SESSION_TIMEOUT_MS="2000",
        MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS="500",
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
    )
    rng = random.Random(7)
    payloads: list[TrainingCompleted] = []
    ids: list[str] = []
    log_path = tmp_path / "workflow.log"
    log = log_path.open("ab")
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [MLBUS, "run", "workflow"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process

    tail = Tail(kafka)
    try:
        for _ in range(2):
            process = start()
            before = tail.count()
            burst = completions(rng, len(payloads), BURST)
            ids += [ref.id for ref in publish(kafka, burst)]
            payloads += burst
            wait_until(
                lambda before=before: tail.count() > before,
                lambda: "a workflow decision; its log:\n" + log_path.read_text()[-3000:],
                timeout=120,
                interval=0.01,
            )
            time.sleep(rng.uniform(0.0, 0.1))  # between, or in the middle of, decisions
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            time.sleep(0.2)  # what it had published is readable
            assert tail.count() < len(ids), "the kill came after the work"
        final = start()
        wait_until(
            lambda: tail.count() >= len(ids),
            lambda: f"{len(ids)} decisions, have {tail.count()}",
            timeout=120,
            interval=0.2,
        )
        final.send_signal(signal.SIGTERM)
        assert final.wait(30) == 0, log_path.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
        tail.close()

    events = decided(kafka)
    assert len(events) == len({e.id for e in events}) == len(ids), "a decision was published twice"
    assert {e.id for e in events} == {decision_id(i) for i in ids}
    assert {e.causationid for e in events} == set(ids)

    # The same completions, decided by a workflow nobody killed.
    clean = replace(kafka, topic_prefix=unique("t") + ".")
    apply_topics(clean)
    define(clean, pipeline_text())
    publish(clean, payloads)
    catch_up(clean, unique("g-"))

    def outcome(k: KafkaConfig) -> dict[str, str]:
        return {
            e.data.version: t
            for t in ("model.promoted", "model.rejected")
            for e in read_events(k, t)
        }

    promoted = [e.data.version for e in read_events(kafka, "model.promoted")]
    assert promoted and len(promoted) < len(ids)  # both kinds of decision were made
    assert outcome(kafka) == outcome(clean)
