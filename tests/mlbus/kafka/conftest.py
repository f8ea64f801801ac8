"""Fixtures of the bus runtime's tests (helpers live in support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from mlbus.journal.capture import Capture
from mlbus.kafka import quiet
from mlbus.kafka.config import KafkaConfig
from tests.mlbus.kafka.support import Script


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Script]]:
    """Start a Python script (source text) as its own process; every one still running at
    teardown is killed, so no test leaves a consumer behind."""
    started: list[Script] = []

    def start(
        source: str,
        args: Sequence[str],
        name: str = "consumer.py",
        env: Mapping[str, str] | None = None,
    ) -> Script:
        path = tmp_path / name
        if not path.exists():
            path.write_text(source)
        script = Script(path, args, env)
        started.append(script)
        return script

    yield start
    for script in started:
        script.kill()


@pytest.fixture
def journaled(brokers, tmp_path: Path, monkeypatch) -> Iterator[KafkaConfig]:  # type: ignore[no-untyped-def]
    """A broker of its own (with the catalog's topics) and a journal capture of it running,
    as under `mlbus up`; a quiet consumer wakes only through the journal here (no wake-up by
    time), and is quiet after a second idle. Not the session broker: its capture would read
    every topic every test of the session made, and the records they keep writing."""
    monkeypatch.setattr(quiet, "QUIET_AT_MOST", 3600.0)
    monkeypatch.setattr(quiet, "QUIET_AFTER", 1.0)
    _, kafka = brokers()
    journal = tmp_path / "journal"
    # No lower priority: beside the other test workers' processes a niced capture can be
    # kept off the CPU for longer than these tests wait (priority is not the point).
    capture = Capture(kafka, journal, sync_seconds=0.05, nice=0)
    capture.start()
    try:
        yield replace(kafka, journal=str(journal))
    finally:
        capture.stop()
