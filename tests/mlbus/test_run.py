"""`mlbus run <service>`: one service alone in the foreground, as a container runs it — its
manifest's group and source, no supervisor and no child process, exit 0 on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from mlbus.kafka.config import KafkaConfig
from mlbus.services import service
from tests.mlbus.test_cli import (
    MLBUS,
    clean_env,
    env,  # noqa: F401 - a fixture
    mlbus,
    ok,
    one_line_error,
    read_topic,
)

pytestmark = pytest.mark.integration


def test_run_names_the_services_when_the_service_is_unknown(tmp_path: Path) -> None:
    result = mlbus("run", "validatr", env=clean_env(MLBUS_DATA_DIR=str(tmp_path)))
    assert result.returncode == 2
    one_line_error(result, "unknown service 'validatr'", "validator", "trainer", "serve", "api")


def test_a_service_that_never_ran_is_not_alive(tmp_path: Path) -> None:
    result = mlbus("services", "alive", "trainer", env=clean_env(MLBUS_DATA_DIR=str(tmp_path)))
    assert result.returncode == 1 and "no heartbeat" in result.stdout


def _committed(kafka: KafkaConfig, group: str, topic: str) -> int:
    """Records of `topic` that consumer group `group` has committed, over its partitions."""
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return sum(max(tp.offset, 0) for tp in offsets)
    finally:
        consumer.close()


def _children(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def test_run_validator_is_the_validator_alone_in_its_manifest_group(
    env: dict[str, str],  # noqa: F811 - the fixture imported above
    kafka: KafkaConfig,
) -> None:
    validator = service("validator")
    proc = subprocess.Popen(
        [MLBUS, "run", "validator"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ok(mlbus("datasets", "sample", "iris", env=env))
        topic = kafka.topic("dataset.validated")
        deadline = time.monotonic() + 60
        validated: list[Any] = []
        while not validated:
            assert proc.poll() is None, f"mlbus run validator exited: {proc.communicate()}"
            assert time.monotonic() < deadline, "no dataset.validated within 60s"
            validated = read_topic(kafka.bootstrap, topic, timeout=5)
        event = json.loads(validated[0].value())
        assert event["source"] == validator.source
        assert event["data"]["name"] == "iris"

        # The manifest's group, behind the topic prefix, committed what it validated.
        group = validator.group_id(kafka.topic_prefix)
        deadline = time.monotonic() + 30
        while _committed(kafka, group, kafka.topic("dataset.created")) < 1:
            assert time.monotonic() < deadline, f"group {group} committed nothing"
            time.sleep(0.2)

        # Its heartbeat: what the Kubernetes probes of a service with no HTTP endpoint ask.
        alive = mlbus("services", "alive", "validator", env=env)
        assert alive.returncode == 0, alive.stdout + alive.stderr
        stale = mlbus("services", "alive", "validator", "--within", "0", env=env)
        assert stale.returncode == 1 and "last heartbeat" in stale.stdout

        # The service itself, not a supervisor: no child process, no supervisor status.
        assert _children(proc.pid) == []
        assert not (Path(env["MLBUS_DATA_DIR"]) / "services.json").exists()

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {out}\nstderr: {err}"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
