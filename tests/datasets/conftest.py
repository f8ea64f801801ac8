"""Fixtures of the dataset manager's tests: an object store (the local folder, or a bucket on
the moto S3 server), an inbox folder it may read input files from, and a registry on the
session broker with this test's own topics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mlbus.datasets.registry import DatasetRegistry
from mlbus.kafka.config import KafkaConfig
from mlbus.storage import ObjectStore
from tests.mlbus.storage_support import STORE_KINDS, make_store


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    """Where input files are put; the store's only allowed root besides itself."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path, inbox: Path) -> ObjectStore:
    store = make_store(request.param, request, tmp_path)
    store.allowed_roots = [str(inbox)]
    return store


@pytest.fixture
def registry(store: ObjectStore, kafka: KafkaConfig) -> Iterator[DatasetRegistry]:
    with DatasetRegistry(store, kafka) as registry:
        yield registry
