"""Fixtures of the lineage tests: a store on each SQL backend (its own PostgreSQL schema, so
tests sharing the session's database never see each other's tables), and the `mlbus`
command run against the test's broker, topic prefix and store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.lineage.store import LineageStore
from mlbus.kafka.config import KafkaConfig
from tests.conftest import unique

MLBUS = str(Path(sys.executable).parent / "mlbus")


@pytest.fixture
def store(sql_url: str) -> Iterator[LineageStore]:
    opened = LineageStore.open(sql_url, schema=unique("lineage_"))
    try:
        yield opened
    finally:
        opened.drop()
        opened.close()


def fresh_store(like: LineageStore) -> LineageStore:
    """Another empty store on the same backend (a sibling file or schema); the caller drops."""
    if like.backend == "sqlite":
        from sqlalchemy.engine import make_url

        path = make_url(like.url).database
        assert path
        return LineageStore.open(f"sqlite:///{path}.{unique('other')}")
    return LineageStore.open(like.url, schema=unique("lineage_"))


def cli_env(kafka: KafkaConfig, data_dir: Path, metadata_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLBUS_")}
    return env | {
        "MLBUS_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "MLBUS_TOPIC_PREFIX": kafka.topic_prefix,
        "MLBUS_METADATA_URL": metadata_url,
        "MLBUS_DATA_DIR": str(data_dir),
        # the broker is named explicitly, so mlbus takes it for a real cluster and keeps
        # Kafka's 45 s session timeout (a ~23 s group join); shared/BROKER.md
        "MLBUS_KAFKA__SESSION_TIMEOUT_MS": "2000",
        "MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "MLBUS_KAFKA__FETCH_WAIT_MAX_MS": "10",
        "COLUMNS": "250",
    }


def mlbus(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MLBUS, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"`{' '.join(result.args[1:])}` exited {result.returncode}\n"
        f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
    )
    return result
