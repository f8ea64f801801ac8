"""Idle consumers where `mlbus up` keeps a journal (mlbus/kafka/quiet.py), against the real
broker and a real journal capture: the consumer loop and the positioned loop stop fetching
once idle, and the journal wakes them for the next records, which they handle once each
(the log view's case is in test_logview.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace

import pytest

from mlbus.journal.format import DURABLE_FILE
from mlbus.kafka import quiet
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.positioned import Batch, Partition, PositionedLoop
from tests.mlbus.kafka.support import DEADLINE, progress, publish, wait_until

TOPIC = "training.progress"


def _events(n: int, start: int) -> list:
    return [progress(run_id=f"r{i}", model=f"m{i}", epoch=1) for i in range(start, start + n)]


def _in_thread(run) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(install_signal_handlers=False)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_an_idle_consumer_loop_stops_fetching_and_the_journal_wakes_it(journaled, group):
    seen: list[str] = []
    loop = ConsumerLoop(
        journaled, group=group, name="quiet", handlers={TOPIC: lambda e, r: seen.append(e.id)}
    )
    thread, errors = _in_thread(loop.run)
    try:
        for total in (4, 8):
            wait_until(lambda: loop.quiet, "the loop to go quiet")
            sent = publish(journaled, _events(4, total))
            wait_until(lambda n=total: len(seen) >= n, lambda: f"handled: {len(seen)}")
            assert sorted(seen[-4:]) == sorted(r.id for r in sent)
    finally:
        loop.stop()
        thread.join(DEADLINE)
    assert not errors, errors
    assert len(seen) == len(set(seen)) == 8


class Rows:
    """A sink that keeps rows and positions in memory."""

    def __init__(self) -> None:
        self.rows: list[tuple[Partition, int]] = []
        self.stored: dict[Partition, int] = {}

    def positions(self, partitions: list[Partition]) -> Mapping[Partition, int]:
        return {p: self.stored[p] for p in partitions if p in self.stored}

    def write(self, batch: Batch, positions: Mapping[Partition, int]) -> None:
        self.rows += [(p, m.offset()) for p, ms in batch.items() for m in ms]
        self.stored.update(positions)

    def release(self, partitions: list[Partition], *, lost: bool) -> None:
        pass


def test_an_idle_positioned_loop_stops_fetching_and_the_journal_wakes_it(journaled, group):
    publish(journaled, _events(5, 0))  # read before it goes quiet
    sink = Rows()
    loop = PositionedLoop(journaled, sink, group=group, topics=[TOPIC], name="quiet")
    thread, errors = _in_thread(loop.run)
    try:
        for total in (5, 10):
            wait_until(lambda: loop.quiet, "the loop to go quiet")
            assert len(sink.rows) == total
            publish(journaled, _events(5, total))
            wait_until(lambda n=total: len(sink.rows) >= n + 5, lambda: f"rows: {len(sink.rows)}")
    finally:
        loop.stop()
        thread.join(DEADLINE)
    assert not errors, errors
    assert len(sink.rows) == len(set(sink.rows)) == 15


@pytest.mark.parametrize("journal", ["missing", "its mlbus up gone"])
def test_a_loop_stays_fetching_where_no_live_capture_keeps_the_journal(
    kafka, group, tmp_path, monkeypatch, journal
):
    # An embedded broker in a data dir whose journal no running `mlbus up` writes (started by
    # other means, or a journal an earlier `mlbus up` left): nothing there would wake a
    # quiet consumer, so none goes quiet.
    monkeypatch.setattr(quiet, "QUIET_AT_MOST", 3600.0)
    monkeypatch.setattr(quiet, "QUIET_AFTER", 0.5)
    folder = tmp_path / "journal"
    folder.mkdir()
    if journal == "its mlbus up gone":
        ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                               capture_output=True, text=True, check=True)  # fmt: skip
        state = {"format": 1, "pid": int(ended.stdout), "positions": {}}
        (folder / DURABLE_FILE).write_text(json.dumps(state))
    seen: list[str] = []
    loop = ConsumerLoop(
        replace(kafka, journal=str(folder)), group=group, name="fetching",
        handlers={TOPIC: lambda e, r: seen.append(e.id)},
    )  # fmt: skip
    thread, errors = _in_thread(loop.run)
    try:
        time.sleep(2.0)  # four times QUIET_AFTER without a record
        assert not loop.quiet
        sent = publish(kafka, _events(3, 0))
        wait_until(lambda: len(seen) >= 3, lambda: f"handled: {len(seen)}", timeout=20)
        assert sorted(seen) == sorted(r.id for r in sent)
    finally:
        loop.stop()
        thread.join(DEADLINE)
    assert not errors, errors
