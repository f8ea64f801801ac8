"""Session fixtures on real parts: a Kafka-protocol broker (the embedded Tansu broker, or
the cluster in MLBUS_TEST_KAFKA_BOOTSTRAP), an S3 API on loopback (moto server mode),
SQLite, and PostgreSQL (MLBUS_TEST_POSTGRES_URL; CI and `make test` set it).

Tests get random topic prefixes and group names, so they never see each other's records.
Every process or server started here is stopped here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mlbus.broker import EmbeddedBroker
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig

POSTGRES_URL = os.environ.get("MLBUS_TEST_POSTGRES_URL", "")

# Several test workers share few cores: torch's default of one OpenMP thread per core in every
# worker (and in every service a test starts, which inherit this) oversubscribes them, and
# spinning OpenMP threads then slow each other down many times over. Tests that are about
# thread counts set their own.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_report_header(config: pytest.Config) -> list[str]:
    kafka = os.environ.get("MLBUS_TEST_KAFKA_BOOTSTRAP") or "embedded Tansu broker"
    return [f"mlbus: kafka={kafka}; postgres={POSTGRES_URL or 'NOT CONFIGURED'}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that touch no fixture of a real part are unit tests unless marked otherwise.
    real = {"broker", "kafka", "s3", "sql_url", "postgres_url"}
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("unit"):
            continue
        fixtures = set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.integration if fixtures & real else pytest.mark.unit)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


# -- Kafka ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaConfig]:
    """Connection to the session's broker (no topic prefix, no topics created)."""
    external = os.environ.get("MLBUS_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield KafkaConfig(bootstrap=external, embedded=False)
        return
    with EmbeddedBroker(tmp_path_factory.mktemp("broker"), record=False) as embedded:
        yield KafkaConfig(bootstrap=embedded.bootstrap, embedded=True)


@pytest.fixture
def kafka(broker: KafkaConfig) -> KafkaConfig:
    """The session broker with this test's own copy of every catalog topic."""
    config = replace(broker, topic_prefix=unique("t") + ".")
    apply_topics(config)
    return config


@pytest.fixture
def group() -> str:
    return unique("g-")


#: The topic prefix on a test's own brokers (`brokers`).
OWN_BROKER_PREFIX = "j."


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Any]:
    """Start fresh embedded brokers of the test's own (each with the catalog's topics, under
    `OWN_BROKER_PREFIX`), for what the session broker's other tests would disturb; all
    stopped at the end."""
    started: list[EmbeddedBroker] = []

    def start() -> tuple[EmbeddedBroker, KafkaConfig]:
        broker = EmbeddedBroker(tmp_path / f"broker{len(started)}", record=False)
        started.append(broker)
        broker.start()
        kafka = KafkaConfig(
            bootstrap=broker.bootstrap, embedded=True, topic_prefix=OWN_BROKER_PREFIX
        )
        apply_topics(kafka)
        return broker, kafka

    yield start
    for broker in started:
        broker.stop()


# -- S3 -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3() -> Iterator[dict[str, str]]:
    """A real S3 API on loopback (moto in server mode). Yields the endpoint and credentials;
    buckets must be created in a region other than us-east-1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {
            "endpoint_url": f"http://{host}:{port}",
            "key": "testing",
            "secret": "testing",
            "region": "eu-west-1",
        }
    finally:
        server.stop()


# -- SQL ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the session, dropped at the end."""
    if not POSTGRES_URL:
        pytest.fail("MLBUS_TEST_POSTGRES_URL is not set (make test sets it)")
    import sqlalchemy as sa

    from mlbus.settings import load_settings

    base = load_settings(metadata_url=POSTGRES_URL).metadata_url
    name = unique("mlbus_test_")
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield str(sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


_SQL_BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


@pytest.fixture(params=_SQL_BACKENDS)
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each SQL backend in turn: SQLite always, PostgreSQL when configured."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_url")
