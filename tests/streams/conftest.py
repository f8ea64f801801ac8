"""Fixtures of the stream processor tests: `mlbus streams` run as a real process against
the session broker (the test's topic prefix, 1-second windows), and its Prometheus page."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlbus.kafka.config import KafkaConfig

MLBUS = Path(sys.executable).parent / "mlbus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamsProcess:
    def __init__(self, env: dict[str, str], args: list[str], log: Path) -> None:
        self.metrics_port = free_port()
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()/kill()
        self.process = subprocess.Popen(
            [str(MLBUS), "streams", "--metrics-port", str(self.metrics_port), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def scrape(self) -> str:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2
            ) as r:
                return r.read().decode()
        except OSError:
            return ""

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mlbus streams ignored SIGTERM for {timeout:.0f}s; log:\n{self.log()}")
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def streams_env(kafka: KafkaConfig, tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLBUS_")},
        "MLBUS_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "MLBUS_TOPIC_PREFIX": kafka.topic_prefix,
        "MLBUS_DATA_DIR": str(tmp_path / "data"),
        # The session broker is the embedded one: short group timeouts (docs/broker.md).
        "MLBUS_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "MLBUS_STREAMS__WINDOW_SECONDS": "1",
        "MLBUS_STREAMS__HOPPING_SECONDS": "3",
        "MLBUS_STREAMS__GRACE_SECONDS": "0.5",
        "MLBUS_STREAMS__ALERT_WINDOWS": "3",
        "MLBUS_STREAMS__MAX_ERROR_RATE": "0.05",
        "MLBUS_STREAMS__MAX_LATENCY_P99_SECONDS": "0.5",
        "MLBUS_STREAMS__MAX_PSI": "0.2",
        "MLBUS_STREAMS__MIN_SAMPLES": "50",
    }


@pytest.fixture
def run_streams(
    streams_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., StreamsProcess]]:
    started: list[StreamsProcess] = []

    def start(*args: str) -> StreamsProcess:
        process = StreamsProcess(streams_env, list(args), tmp_path / f"streams.{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
