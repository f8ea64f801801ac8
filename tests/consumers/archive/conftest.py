"""Fixtures of the archive tests: a log with events of several topics (valid, binary-mode,
invalid, keyless), object stores on a local folder and on the moto S3 server, and the
`mlbus` command pointed at the test's broker, topic prefix and store."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlbus.kafka.config import KafkaConfig
from mlbus.storage import ObjectStore
from tests.consumers.archive.support import FAST, fill_log
from tests.mlbus.storage_support import local_store, s3_store
from tests.mlbus.test_cli import clean_env


@pytest.fixture
def local(tmp_path: Path) -> ObjectStore:
    return local_store(tmp_path / "store")


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A fresh object store: a local folder, then a bucket on the moto S3 server."""
    if request.param == "file":
        return local_store(tmp_path / "store")
    return s3_store(request.getfixturevalue("s3"), prefix="objects")


@pytest.fixture
def log(kafka: KafkaConfig) -> KafkaConfig:
    """`kafka` with a mixed log on it (see support.fill_log)."""
    fill_log(kafka)
    return kafka


@pytest.fixture
def cli_env(kafka: KafkaConfig, local: ObjectStore, tmp_path: Path) -> dict[str, str]:
    """The `mlbus` command on the session broker, this test's prefix and its local store."""
    return clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        MLBUS_OBJECT_STORE_URL=local.url,
        **FAST,
    )
