"""The live projector against the real broker: incremental projection while producers
publish equals a rebuild from offset 0 and a rebuild from the archive (both backends), and
`mlbus lineage project` killed with SIGKILL at random points and restarted ends identical
to a clean rebuild."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mlbus.consumers.archive.reader import read_archive
from mlbus.consumers.archive.writer import Archiver
from mlbus.consumers.lineage.live import LiveProjector
from mlbus.consumers.lineage.projector import TOPICS
from mlbus.consumers.lineage.store import LineageError, LineageStore
from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import read_log
from mlbus.storage import ObjectStore
from tests.consumers.lineage.conftest import MLBUS, cli_env, rebuilt_store
from tests.consumers.lineage.generator import generate_log, produce
from tests.mlbus.kafka.support import wait_until


def positions(store: LineageStore) -> dict[tuple[str, int], int]:
    try:
        return store.positions()
    except (LineageError, TransientError):  # no tables yet (the projector creates them)
        return {}


def caught_up(store: LineageStore, ends: dict[tuple[str, int], int]) -> bool:
    found = positions(store)
    return all(found.get(tp, 0) >= end for tp, end in ends.items() if tp[0] in TOPICS)


def test_incremental_projection_equals_rebuild_from_offset_zero_and_from_the_archive(
    kafka: KafkaConfig, store: LineageStore, group: str, tmp_path: Path
) -> None:
    records = generate_log(50_000, seed=11)
    projector = LiveProjector(kafka, store, group=group, batch_size=2000)
    thread = threading.Thread(
        target=projector.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    ends: dict[tuple[str, int], int] = {}
    try:
        for start in range(0, len(records), 10_000):  # producers publish while it projects
            for tp, end in produce(kafka, records[start : start + 10_000]).items():
                ends[tp] = max(ends.get(tp, 0), end)
        wait_until(lambda: caught_up(store, ends), "the live projector to catch up", 120)
    finally:
        projector.stop()
        thread.join(30)
    assert not thread.is_alive()
    counts = store.counts()
    assert counts["model_versions"] > 1000 and counts["skipped"] > 0
    assert counts["decisions"] > 1000 and counts["lineage_edges"] > 10_000

    other = rebuilt_store(store, read_log(kafka, TOPICS))
    try:
        assert other.dump_json() == store.dump_json()
        assert other.positions() == store.positions()
    finally:
        other.drop()
        other.close()

    # The same log, archived to Parquet on the object store, rebuilds the same store.
    archive = ObjectStore((tmp_path / "objects").as_uri())
    stats = Archiver(kafka, archive, group=f"{group}-archive").run(
        stop_at_end=True, install_signal_handlers=False
    )
    assert stats.records >= len(records)
    from_archive = rebuilt_store(store, read_archive(archive, TOPICS))
    try:
        assert from_archive.dump_json() == store.dump_json()
    finally:
        from_archive.drop()
        from_archive.close()


@pytest.mark.integration
def test_sigkill_at_random_points_then_restart_equals_a_clean_rebuild(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    env = cli_env(kafka, tmp_path, url)
    records = generate_log(4000, seed=21)
    rng = random.Random(4)
    store = LineageStore(url)
    ends: dict[tuple[str, int], int] = {}
    chunk = len(records) // 20 + 1
    log = open(tmp_path / "projector.log", "ab")  # noqa: SIM115 - closed below
    for trial in range(20):
        for tp, end in produce(kafka, records[trial * chunk : (trial + 1) * chunk]).items():
            ends[tp] = max(ends.get(tp, 0), end)
        # a fresh group each time: positions come from SQL, and the killed member's session
        # would otherwise delay the next assignment
        process = subprocess.Popen(
            [MLBUS, "lineage", "project", "--group", f"lineage-kill-{trial}", "--batch", "37"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            if trial % 2 == 0:  # anywhere: starting up, joining, projecting
                time.sleep(rng.uniform(0.2, 2.0))
            else:  # once it is projecting: between or inside its transactions
                before = sum(positions(store).values())
                wait_until(
                    lambda: sum(positions(store).values()) > before,  # noqa: B023
                    lambda: (
                        "the projector to make progress; its log:\n"
                        + (tmp_path / "projector.log").read_text(errors="replace")[-3000:]
                    ),
                    60,
                )
                time.sleep(rng.uniform(0.0, 0.3))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
    log.close()

    final_log = tmp_path / "final.log"
    with open(final_log, "wb") as out:
        final = subprocess.Popen(
            [MLBUS, "lineage", "project", "--group", "lineage-final"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: caught_up(store, ends), "the restarted projector to catch up", 90)
        # SIGTERM once it runs (not while Python is still importing): exits 0
        wait_until(lambda: "caught up" in final_log.read_text(), "the projector to say so", 30)
        final.send_signal(signal.SIGTERM)
        final.wait(30)
        assert final.returncode == 0, final_log.read_text()
    finally:
        if final.poll() is None:
            final.kill()
            final.wait()
    clean = rebuilt_store(store, read_log(kafka, TOPICS))
    try:
        assert clean.dump_json() == store.dump_json()
        assert clean.positions() == store.positions()
    finally:
        clean.close()
        store.close()
