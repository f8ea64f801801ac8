"""The archiver: every record of every contract topic lands in Parquet on the object store
(file:// and s3://) exactly once, across re-runs, SIGKILLs and restarts, with its offsets
committed only after the file is durable."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mlbus.consumers.archive.layout import ROOT, list_files
from mlbus.consumers.archive.reader import read_archive
from mlbus.consumers.archive.writer import Archiver
from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Backoff
from mlbus.schemas.catalog import topic
from mlbus.storage import ObjectStore, Staged
from tests.consumers.archive.support import (
    TOPICS_USED,
    assert_exactly_once,
    produce,
    stored_rows,
    the_log,
    wait_for_archive,
)
from tests.mlbus.kafka.support import (
    Producing,
    committed_offset,
    dataset,
    publish,
    wait_until,
)
from tests.mlbus.test_cli import MLBUS


def archive(kafka: KafkaConfig, store: ObjectStore, group: str, **kwargs: object) -> Archiver:
    archiver = Archiver(kafka, store, group=group, **kwargs)  # type: ignore[arg-type]
    archiver.run(stop_at_end=True, install_signal_handlers=False)
    return archiver


def test_every_record_is_archived_once_with_its_columns(log, store, group):
    archiver = archive(log, store, group, flush_bytes=4000)
    records = assert_exactly_once(log, store)
    assert archiver.stats.records == len(records)
    assert archiver.stats.files > 3  # flushed by size, not in one go

    keys = store.list(ROOT)
    assert all(k.split("/")[2].startswith("date=") for k in keys), keys[:3]
    table = pq.read_table(store.open(keys[0]))
    assert table.column_names == [
        "topic",
        "partition",
        "offset",
        "timestamp",
        "key",
        "headers",
        "value",
        "event_id",
        "event_type",
    ]
    rows = [
        row
        for f in list_files(store, ["training.progress", "dataset.created"])
        for row in pq.read_table(store.open(f.key)).to_pylist()
    ]
    binary = [r for r in rows if r["key"] == b"binary"]
    assert [(r["event_id"], r["event_type"]) for r in binary] == [
        ("binary-mode-id", "training.progress")
    ]
    garbage = [r for r in rows if r["value"].startswith(b"\x00")]
    assert len(garbage) == 1 and garbage[0]["event_id"] is None
    valid = [r for r in rows if r["value"].startswith(b'{"specversion"')]
    assert valid and all(r["event_id"] and r["event_type"] == r["topic"] for r in valid)
    assert all(r["topic"] in ("training.progress", "dataset.created") for r in rows)

    # Offsets are committed after the files: the group's position is the archive's end.
    last = {}
    for r in records:
        last[(r.topic, r.partition)] = r.offset + 1
    for (name, partition), end in last.items():
        assert committed_offset(log, group, log.topic(name), partition) == end


def test_a_rerun_archives_only_what_is_new_even_under_another_group(log, local, group):
    store = local
    archive(log, store, group)
    before = set(store.list(ROOT))
    publish(log, [dataset(name="later", version=f"v{i}") for i in range(5)])
    archive(log, store, group)
    added = set(store.list(ROOT)) - before
    assert added and all("/dataset.created/" in k for k in added)
    # A group that never committed anything still starts where the archive ends: the
    # files are the position, so a crash between a write and its commit duplicates nothing.
    second = archive(log, store, group + "-fresh")
    assert second.stats.records == 0 and set(store.list(ROOT)) == before | added
    assert_exactly_once(log, store)


def test_records_are_filed_under_the_date_of_their_timestamp(kafka, local, group):
    day = 24 * 3600 * 1000
    base = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    stamps = [base - 1, base, base + 1, base + day, base - 1]  # back across midnight too
    produce(kafka, "serving.alert", [(b"same-key", b"{}", ts) for ts in stamps])
    archive(kafka, local, group)
    files = list_files(local, ["serving.alert"])
    assert [(f.day, f.first, f.last) for f in files] == [
        ("2025-12-31", 0, 0),
        ("2026-01-01", 1, 2),
        ("2026-01-02", 3, 3),
        ("2025-12-31", 4, 4),
    ]
    assert [r.timestamp_ms for r in read_archive(local, ["serving.alert"])] == stamps
    window = read_archive(local, ["serving.alert"], since_ms=base, until_ms=base + day - 1)
    assert [r.offset for r in window] == [1, 2]


class FailingStore(ObjectStore):
    """A real local store whose writes fail at the given calls (1-based), as a store that
    goes down in the middle of a flush does; `on_failure` runs at each failure."""

    def __init__(self, url: str, fail_at: set[int], on_failure: Callable[[], None]) -> None:
        super().__init__(url)
        self.calls = 0
        self.fail_at = fail_at
        self.on_failure = on_failure

    @contextmanager
    def staged(self, key: str | None = None) -> Iterator[Staged]:
        self.calls += 1
        if self.calls in self.fail_at:
            self.on_failure()
            raise TransientError(f"the store is down (write {self.calls})")
        with super().staged(key) as out:
            yield out


def test_a_flush_cut_short_by_the_store_keeps_its_files_and_the_retry_writes_the_rest(
    log, tmp_path, group
):
    def more_records() -> None:  # the retry then holds newer records of every partition
        for name in TOPICS_USED:
            for partition in range(topic(name).partitions):
                produce(log, name, [(b"k", b"{}", None)], partition=partition)

    store = FailingStore((tmp_path / "flaky").as_uri(), {2, 3}, more_records)
    archiver = Archiver(
        log,
        store,
        group=group,
        flush_bytes=10_000_000,
        flush_seconds=0.0,
        backoff=Backoff(0.3, 0.3),
    )
    running = threading.Thread(
        target=archiver.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    running.start()
    try:
        wait_for_archive(log, store)
    finally:
        archiver.stop()
        running.join(30)
    assert not running.is_alive()
    assert archiver.loop.stats.retries == 2
    assert_exactly_once(log, store)


# -- as a service: SIGKILL, restart, SIGTERM ---------------------------------------------------


def start_archiver(cli_env: dict[str, str], tmp_path: Path, name: str, **env: str):
    out = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [MLBUS, "archive", "run", "--group", "archiver"],
        env=cli_env | env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    process.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
    return process


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigkill_and_restart_while_producing_loses_and_duplicates_nothing(
    kafka, local, cli_env, tmp_path
):
    often = {"MLBUS_ARCHIVE__FLUSH_SECONDS": "0.1", "MLBUS_ARCHIVE__FLUSH_BYTES": "3000"}
    processes = []
    try:
        with Producing(kafka, lambda i: dataset(name=f"d{i}")):
            for run in range(2):
                process = start_archiver(cli_env | often, tmp_path, f"run{run}")
                processes.append(process)
                had = len(local.list(ROOT))
                wait_until(
                    lambda had=had: len(local.list(ROOT)) > had + 3,
                    f"archiver run {run} writing files (had {had})",
                )
                assert stop(process, signal.SIGKILL) == -signal.SIGKILL
        last = start_archiver(cli_env | often, tmp_path, "last")
        processes.append(last)
        wait_for_archive(kafka, local)
        # The earlier runs may have archived everything already: stop the last one only once
        # it runs (a SIGTERM during its imports would kill it before it can stop cleanly).
        wait_until(
            lambda: "caught up" in (tmp_path / "last.log").read_text(),
            "the last archiver to catch up",
        )
        code = stop(last)
        assert code == 0, (tmp_path / "last.log").read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = assert_exactly_once(kafka, local)
    assert len(log) > 100
    assert len(list_files(local)) > 10


def test_sigterm_flushes_what_is_buffered_and_exits_0(log, local, cli_env, tmp_path):
    never = {"MLBUS_ARCHIVE__FLUSH_SECONDS": "3600", "MLBUS_ARCHIVE__FLUSH_BYTES": "1000000000"}
    process = start_archiver(cli_env | never, tmp_path, "term")
    try:
        wait_until(lambda: "caught up" in process.log_path.read_text(), "the archiver catching up")
        assert not local.list(ROOT)  # everything is still buffered
        assert stop(process) == 0, process.log_path.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_exactly_once(log, local)
    assert stored_rows(local)


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_the_archive_reads_back_as_the_log(log, store, group):
    archive(log, store, group, flush_bytes=2000)
    topics = ["training.progress", "dataset.created"]
    assert list(read_archive(store, topics)) == [
        r
        for r in sorted(
            the_log(log, topics), key=lambda r: (topics.index(r.topic), r.partition, r.offset)
        )
    ]
