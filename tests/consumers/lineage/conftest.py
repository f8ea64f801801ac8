"""Fixtures of the lineage tests: a store on each SQL backend (its own PostgreSQL schema, so
tests sharing the session's database never see each other's tables), and the `mlbus`
command run against the test's broker, topic prefix and store."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import LogRecord
from tests.conftest import unique
from tests.mlbus.test_cli import MLBUS, clean_env, mlbus, ok  # noqa: F401 - re-exported


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


def rebuilt_store(like: LineageStore, records: Iterable[LogRecord]) -> LineageStore:
    """`records` rebuilt the way `mlbus lineage rebuild` does (a staging store, the writer
    process, the swap) into a fresh store beside `like`; the caller drops it."""
    from mlbus.consumers.lineage.rebuild import rebuild
    from mlbus.consumers.lineage.store import staging_for, swap_in

    target = fresh_store(like)
    staging = staging_for(target)
    rebuild(staging, records)
    swap_in(staging, target)
    return LineageStore.open(target.url, schema=target.schema)


def cli_env(kafka: KafkaConfig, data_dir: Path, metadata_url: str) -> dict[str, str]:
    return clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_METADATA_URL=metadata_url,
        MLBUS_DATA_DIR=str(data_dir),
        # the broker is named explicitly, so mlbus takes it for a real cluster and keeps
        # Kafka's 45 s session timeout (a ~23 s group join); docs/broker.md
        MLBUS_KAFKA__SESSION_TIMEOUT_MS="2000",
        MLBUS_KAFKA__HEARTBEAT_INTERVAL_MS="500",
        MLBUS_KAFKA__FETCH_WAIT_MAX_MS="10",
        COLUMNS="250",
    )
