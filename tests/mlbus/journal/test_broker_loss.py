"""The embedded broker SIGKILLed under HTTP inference load: `mlbus up` restores a new one from
the journal behind the same address while every service runs on (same processes), the model
server answers every request throughout, and every record the journal had when the broker
died, and every record acknowledged after, is there at the offset its producer was told."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from mlbus import artifacts
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.training import Artifact
from mlbus.storage import ObjectStore
from tests.conftest import unique
from tests.mlbus.test_broker import wait_gone
from tests.mlbus.test_cli import MLBUS, clean_env
from tests.serving.conftest import _train, body, promote

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Platform:
    """`mlbus up --only serve,validator,streams` (or `only`) on a data dir of its own."""

    def __init__(self, data_dir: Path, only: str = "serve,validator,streams") -> None:
        self.data_dir = data_dir
        self.serve_port = free_port()
        self.env = clean_env(
            MLBUS_DATA_DIR=str(data_dir),
            MLBUS_SERVING__PORT=str(self.serve_port),
            MLBUS_STREAMS__METRICS_PORT=str(free_port()),
            MLBUS_LOG_LEVEL="WARNING",
        )
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [MLBUS, "up", "--only", only],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)[-6000:]

    def wait_for(self, condition: Any, what: str | Callable[[], str], timeout: float = 60.0) -> Any:
        """Poll `condition` until it is true; `what` (or what it returns, for a message that
        says where things stood) names it in the failure."""
        deadline = time.monotonic() + timeout
        while not (found := condition()):
            if self.proc.poll() is not None:
                pytest.fail(
                    f"mlbus up exited ({self.proc.returncode}) waiting for "
                    f"{what() if callable(what) else what}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                said = what() if callable(what) else what
                pytest.fail(f"{said} within {timeout:.0f}s\n{self.output()}")
            time.sleep(0.1)
        return found

    def state(self) -> dict[str, Any]:
        try:  # absent while the gate is closed
            return json.loads((self.data_dir / "broker.json").read_text())
        except FileNotFoundError:
            return {}

    def services(self) -> dict[str, dict[str, Any]]:
        listed = json.loads((self.data_dir / "services.json").read_text())["services"]
        return {s["service"]: s for s in listed}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def read_all(bootstrap: str, topic: str) -> dict[int, bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "unused",
            "enable.partition.eof": True,
            "log.connection.close": False,
        }
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: dict[int, bytes] = {}
    try:
        while (m := consumer.poll(10)) is not None and not m.error():
            out[m.offset()] = m.value()
    finally:
        consumer.close()
    return out


def test_a_sigkilled_broker_is_restored_while_services_and_http_inference_run_on(
    tmp_path: Path,
) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = data.data.astype(np.float32)
    trained = _train(x[:300], data.target[:300].astype(np.int64), seed=1, epochs=1)
    store = ObjectStore((tmp_path / "data" / "objects").as_uri())  # the platform's store
    artifact = Artifact(**artifacts.save(store, "models/digits/v1", trained.model, trained.card))

    up = Platform(tmp_path / "data")
    try:
        up.wait_for(lambda: any("mlbus is up" in line for line in up.lines), "mlbus is up")
        first = up.state()
        bootstrap = first["bootstrap"]
        kafka = KafkaConfig(bootstrap=bootstrap, embedded=True)
        promote(kafka, "digits", "1", artifact)
        url = f"http://127.0.0.1:{up.serve_port}/v2/models/digits/infer"
        request = body(x[:2])

        def answers() -> bool:
            try:
                return httpx.post(url, json=request, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        up.wait_for(answers, "the model server answering with digits v1", timeout=120)
        up.wait_for(lambda: up.services()["streams"]["state"] == "ready", "streams ready")
        before = {name: (s["pid"], s["restarts"]) for name, s in up.services().items()}

        # A topic of the test's own: records acknowledged, then on disk in the journal.
        topic = unique("loss")
        admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)
        acked: dict[int, bytes] = {}

        def delivered(error: Any, message: Any) -> None:
            assert error is None, error
            acked[message.offset()] = message.value()

        # As every service produces behind the gate (mlbus/kafka/config.py).
        gated = KafkaConfig(bootstrap=bootstrap, embedded=True, gated=True)
        producer = Producer(gated.producer(on_delivery=delivered))
        for i in range(500):
            producer.produce(topic, b"before-%d" % i, partition=0)
        assert producer.flush(30) == 0 and len(acked) == 500
        journal = up.data_dir / "journal" / "durable.json"
        up.wait_for(
            lambda: json.loads(journal.read_text())["positions"].get(topic, {}).get("0") == 500,
            "the journal having the 500 records on disk",
        )

        # HTTP inference load from two threads, across the broker's death and replacement.
        answered: list[int] = []
        failed: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        response = client.post(url, json=request)
                        (answered if response.status_code == 200 else failed).append(
                            response.status_code
                        )
                    except httpx.HTTPError as e:
                        failed.append(repr(e))

        loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for loader in loaders:
            loader.start()
        up.wait_for(lambda: len(answered) > 200, "load running")

        os.kill(int(first["broker_pid"]), signal.SIGKILL)
        wait_gone(int(first["broker_pid"]))
        during = len(answered)
        # Produced while the broker is away: acknowledged once the new one is in place.
        for i in range(500):
            producer.produce(topic, b"after-%d" % i, partition=0)
        up.wait_for(
            lambda: up.state().get("broker_pid") not in (None, first["broker_pid"]),
            "a new broker behind the gate",
        )
        second = up.state()
        assert second["bootstrap"] == bootstrap, "the address moved"
        assert producer.flush(60) == 0 and len(acked) == 1000
        up.wait_for(lambda: len(answered) > during + 200, "more answers after the restore")
        stop.set()
        for loader in loaders:
            loader.join(30)

        assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}\n{up.output()}"
        after = {name: (s["pid"], s["restarts"]) for name, s in up.services().items()}
        assert after == before, "a service was restarted"
        out = "".join(up.lines)
        assert "the embedded broker exited" in out and "new broker at" in out, up.output()

        log = read_all(bootstrap, topic)
        assert {o: v for o, v in log.items() if o in acked} == acked, "acknowledged records lost"
        assert sorted(log) == list(range(1000)), "offsets moved"

        # The services read on: a promotion after the restore reaches the model server.
        promote(kafka, "digits", "2", artifact)
        version = f"http://127.0.0.1:{up.serve_port}/v2/models/digits/versions/2"
        up.wait_for(lambda: httpx.get(version, timeout=5).status_code == 200, "digits v2")
        producer.flush(5)
    finally:
        up.close()
    assert up.proc.returncode == 0, up.output()
    # Every service stopped by itself, the streams service too (docs/broker.md).
    assert "all services stopped cleanly" in "".join(up.lines), up.output()
