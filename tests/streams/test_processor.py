"""The processor between the transport and the engine, without a broker: a fetch is applied
in chunks and its effects are made durable once, and a revocation during a fetch stops it
before anything of the revoked partition is written."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.codec import wrap
from mlbus.settings import StreamsSettings
from mlbus.streams import processor as processor_module
from mlbus.streams.drift import Baselines
from mlbus.streams.exporter import Exporter
from mlbus.streams.processor import StreamProcessor
from mlbus.streams.windows import Engine, WindowConfig
from tests.streams.support import baseline_events, encoded, history


@dataclass
class Record:
    """A fetched record, as the transport hands it over (aiokafka's fields)."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: Any


class Table:
    """The faust table's part the processor uses: its data and its changelog writes."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.writes: list[tuple[int | None, str]] = []

    def send_changelog(self, partition: int | None, key: Any, value: Any) -> None:
        self.writes.append((partition, key))


class Outputs:
    """Where the processor's outputs go: counted, never sent."""

    def __init__(self) -> None:
        self.published = 0
        self.flushes = 0

    def publish(self, *args: Any, **kwargs: Any) -> None:
        self.published += 1

    def flush(self, *args: Any) -> None:
        self.flushes += 1


class Processor(StreamProcessor):
    changelog_flushes = 0

    async def _flush_changelog(self) -> None:
        self.changelog_flushes += 1


def make() -> tuple[Processor, Table, Outputs]:
    baselines = Baselines()
    for payload in baseline_events():
        baselines.add(wrap(payload, source="tests"))
    config = WindowConfig.from_settings(
        StreamsSettings(window_seconds=1, hopping_seconds=3, grace_seconds=0.5), 5
    )
    table, outputs = Table(), Outputs()
    p = Processor(
        KafkaConfig(bootstrap="127.0.0.1:1"),
        Engine(config, baselines),
        table,
        Exporter(retired=lambda *_: False),
        group="tests",
        producer=outputs,  # type: ignore[arg-type]  # publish and flush are what it uses
    )
    return p, table, outputs


def records(partition: int, n: int) -> list[Record]:
    values = encoded(history(total=n, windows=4))
    return [
        Record("t", partition, i, None, key.encode(), value, [])
        for i, (key, value) in enumerate(values)
    ]


def test_a_fetch_is_applied_in_chunks_and_made_durable_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processor_module, "CHUNK", 7)
    p, table, outputs = make()
    fetch = records(0, 100)
    seen: list[int] = []  # records applied, as another task of the loop saw it

    async def other_task() -> None:  # a timer of the app: runs between the chunks
        while True:
            seen.append(p.processed)
            await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        await p.handle(fetch)
        task.cancel()

    asyncio.run(main())
    assert p.processed == len(fetch)
    assert any(0 < n < len(fetch) for n in seen)  # the event loop ran between the chunks
    assert p.changelog_flushes == 1 and outputs.flushes == 1  # once for the whole fetch
    assert outputs.published > 0
    assert {key for _, key in table.writes} >= {"a|0", "w|0"}


def test_a_revocation_during_a_fetch_stops_it_and_writes_nothing_of_the_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processor_module, "CHUNK", 7)
    p, table, _ = make()
    fetch = records(0, 100)

    async def revoke() -> None:  # faust's on_partitions_revoked, between two chunks
        p.revoked([0])

    async def main() -> None:
        task = asyncio.create_task(revoke())
        await p.handle(fetch)
        await task

    asyncio.run(main())
    assert p.processed == 7  # the first chunk only
    assert not [key for partition, key in table.writes if partition == 0]
    assert not p.engine.series  # its state is forgotten: the new owner restores its own
