"""Fixtures of the journal's tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbus.broker import EmbeddedBroker
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig

PREFIX = "j."


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[Any]:
    """Start fresh embedded brokers (each with the catalog's topics); all stopped at the end."""
    started: list[EmbeddedBroker] = []

    def start() -> tuple[EmbeddedBroker, KafkaConfig]:
        broker = EmbeddedBroker(tmp_path / f"broker{len(started)}", record=False)
        started.append(broker)
        broker.start()
        kafka = KafkaConfig(bootstrap=broker.bootstrap, embedded=True, topic_prefix=PREFIX)
        apply_topics(kafka)
        return broker, kafka

    yield start
    for broker in started:
        broker.stop()
