"""A rebuild's projection (`consumers.lineage.rebuild`) on SQLite and PostgreSQL: the same
store as an incremental projection with or without the writer process, the first copy of a
duplicate kept, and failures on either side reported without a process or a partial store
left behind."""

from __future__ import annotations

import gc
import multiprocessing
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.rebuild import REBUILD_GC_THRESHOLDS, rebuild
from mlbus.consumers.lineage.store import LineageError, LineageStore, discard, staging_for, swap_in
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.models import ModelPromoted
from tests.consumers.lineage.conftest import fresh_store
from tests.consumers.lineage.generator import as_log_records, generate_log
from tests.consumers.lineage.test_projector import T0, record


def rebuilt_dump(store: LineageStore, log: list[LogRecord], **options: object) -> bytes:
    target = fresh_store(store)
    try:
        staging = staging_for(target)
        rebuild(staging, log, **options)  # type: ignore[arg-type]
        swap_in(staging, target)
        reopened = LineageStore.open(target.url, schema=target.schema)
        try:
            return reopened.dump_json()
        finally:
            reopened.close()
    finally:
        target.drop()
        target.close()


@pytest.mark.parametrize("writer_process", [True, False])
def test_a_rebuild_equals_the_incremental_projection(
    store: LineageStore, writer_process: bool
) -> None:
    log = as_log_records(generate_log(3000, seed=12))
    Projector(store).project(log, batch_size=200)
    duplicated = log + log[: len(log) // 3]  # a second delivery of a third of the log
    dump = rebuilt_dump(store, duplicated, batch_size=333, writer_process=writer_process)
    assert dump == store.dump_json()
    assert multiprocessing.active_children() == []


def test_of_two_copies_of_an_event_the_first_in_the_log_is_kept(store: LineageStore) -> None:
    promoted = ModelPromoted(model="m", version="v1", reason="manual", actor="bob")
    first = record(promoted, 3, event_id="evt-1", time=T0)
    again = record(promoted, 9, event_id="evt-1", time=T0)
    # the two copies in different batches, so that only the store can tell them apart
    staging = staging_for(store)
    rebuild(staging, [first, again], batch_size=1)
    swap_in(staging, store)
    reopened = LineageStore.open(store.url, schema=store.schema)
    try:
        dump = reopened.dump()
        assert [row["offset"] for row in dump["events"]] == [3]
        assert [row["offset"] for row in dump["decisions"]] == [3]
    finally:
        reopened.close()


def test_a_live_store_is_refused(store: LineageStore) -> None:
    with pytest.raises(LineageError, match="staging store"):
        rebuild(store, [])


def _failing_source(log: list[LogRecord]) -> Iterator[LogRecord]:
    yield from log
    raise RuntimeError("the archive went away")


def test_a_failing_source_stops_the_writer_and_commits_nothing(store: LineageStore) -> None:
    log = as_log_records(generate_log(600, seed=2))
    staging = staging_for(store)
    try:
        with pytest.raises(RuntimeError, match="the archive went away"):
            rebuild(staging, _failing_source(log), batch_size=50)
        assert multiprocessing.active_children() == []
        assert staging.counts()["events"] == 0  # the writer's transaction rolled back
        assert staging.positions() == {}
    finally:
        discard(staging)


def test_a_failing_writer_is_reported_by_the_rebuild(store: LineageStore) -> None:
    staging = staging_for(store)
    target = staging.heap(t.decisions) if staging.heaps else staging.qualified(t.decisions)
    with staging.transaction() as conn:
        conn.execute(sa.text(f"DROP TABLE {target}"))
    try:
        with pytest.raises(LineageError, match="decisions"):  # not transient: no retry cures it
            rebuild(staging, as_log_records(generate_log(600, seed=2)), batch_size=50)
        assert multiprocessing.active_children() == []
    finally:
        discard(staging)


def test_the_collector_runs_less_often_during_a_rebuild_and_as_before_after(
    store: LineageStore,
) -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []

    def source() -> Iterator[LogRecord]:
        yield from as_log_records(generate_log(300, seed=4))
        seen.append(gc.get_threshold())
        raise RuntimeError("stop")

    for writer_process in (True, False):
        staging = staging_for(store)
        try:
            with pytest.raises(RuntimeError, match="stop"):
                rebuild(staging, source(), batch_size=100, writer_process=writer_process)
        finally:
            discard(staging)
        assert gc.get_threshold() == before  # restored, after a failure too
    assert seen == [REBUILD_GC_THRESHOLDS, REBUILD_GC_THRESHOLDS]
