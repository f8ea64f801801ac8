"""Fixtures of the bus runtime's tests (helpers live in support.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

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
