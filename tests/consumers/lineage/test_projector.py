"""The projection core on SQLite and PostgreSQL, fed from memory: order independence,
idempotence, bad input, projection version."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.projector import Projector
from mlbus.consumers.lineage.queries import LineageQueries
from mlbus.consumers.lineage.store import LineageError, LineageStore, NotInLineage
from mlbus.errors import TransientError
from mlbus.kafka.reader import LogRecord
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.training import TrainingCompleted, TrainingRequested, TrainingStarted
from tests.consumers.lineage.conftest import fresh_store
from tests.consumers.lineage.generator import as_log_records, generate_log

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def record(payload, offset: int, **envelope) -> LogRecord:  # type: ignore[no-untyped-def]
    ref, value = encode_new(payload, source="test", **envelope)
    return LogRecord(
        ref.type, 0, offset, None, (ref.key or "").encode(), tuple(STRUCTURED_HEADERS), value
    )


def test_rows_do_not_depend_on_batching_order_or_duplicates(store: LineageStore) -> None:
    log = as_log_records(generate_log(4000, seed=3))
    Projector(store).project(log, batch_size=997)
    expected = store.dump_json()
    assert store.counts()["model_versions"] > 100 and store.counts()["skipped"] > 0

    other = fresh_store(store)
    try:
        # every partition in order (as Kafka delivers), partitions interleaved differently,
        # odd batch sizes, and the whole log delivered a second time
        by_tp: dict[tuple[str, int], list[LogRecord]] = {}
        for r in log:
            by_tp.setdefault((r.topic, r.partition), []).append(r)
        rng = random.Random(5)
        queues = list(by_tp.values())
        interleaved = []
        while queues:
            q = rng.choice(queues)
            interleaved.append(q.pop(0))
            if not q:
                queues.remove(q)
        projector = Projector(other)
        projector.project(interleaved, batch_size=61)
        projector.project(log[: len(log) // 2], batch_size=5000)  # redelivered: no change
        assert other.dump_json() == expected
        assert other.positions() == store.positions()
    finally:
        other.drop()
        other.close()


def test_out_of_order_pieces_are_linked_when_they_arrive(store: LineageStore) -> None:
    request = TrainingRequested.model_validate(
        {
            "model": "m",
            "dataset": {"name": "ghost", "version": "g1"},
            "family": "mlp",
            "hyperparameters": {"lr": 0.1},
            "requested_by": "alice",
        }
    )
    ref, _ = encode_new(request, source="test", event_id="req-1")
    promoted = ModelPromoted(model="m", version="v1", run_id="run-1", reason="manual", actor="bob")
    completed = TrainingCompleted.model_validate(
        {
            "run_id": "run-1",
            "model": "m",
            "version": "v1",
            "request_id": "req-1",
            "family": "mlp",
            "dataset": {"name": "ghost", "version": "g1"},
            "artifact": {"uri": "file:///a", "sha256": "sha256:" + "a" * 64},
            "metrics": {"test": {"accuracy": 0.9}},
            "epochs": 1,
            "code": {"package_version": "0.1", "git_commit": "abc"},
            "duration_seconds": 1.0,
        }
    )
    started = TrainingStarted.model_validate(
        {
            "run_id": "run-1",
            "model": "m",
            "request_id": "req-1",
            "dataset": {"name": "ghost", "version": "g1"},
            "worker": "w1",
        }
    )
    projector = Projector(store)
    # a promotion of a version nobody has seen yet: stored, answered with what is known
    projector.project([record(promoted, 0, time=T0)])
    why = LineageQueries(store).why("m", "v1")
    assert not why.known_version and why.decisions[0].actor == "bob"
    up = LineageQueries(store).upstream("m", "v1")
    # promoted, but no replica reported loading it: not serving
    assert not up.serving and up.run.run_id == "run-1" and up.run.status == "unknown"
    # then the completion (before its start), the start, and the request
    projector.project([record(completed, 0, time=T0)])
    projector.project([record(started, 0, time=T0)])
    projector.project([record(request, 1, event_id="req-1", time=T0)])
    up = LineageQueries(store).upstream("m", "v1")
    assert up.run.status == "completed" and up.run.worker == "w1"
    assert up.run.requested_by == "alice" and up.run.hyperparameters == {"lr": 0.1}
    assert up.run.code_version == "0.1" and up.run.git_commit == "abc"
    # the dataset was never announced: an unknown upstream, not an invented one
    assert [(d.name, d.known) for d in up.datasets] == [("ghost", False)]
    assert ref.id == "req-1"


def test_undecodable_records_are_counted_and_skipped(store: LineageStore) -> None:
    bad = [
        LogRecord("training.completed", 0, 0, None, b"m", (), b"{not json"),
        LogRecord("model.promoted", 1, 0, None, b"m", (), None),
        LogRecord("model.promoted", 1, 1, None, b"m", (), b'{"type": "dataset.created"}'),
    ]
    good = record(ModelPromoted(model="m", version="v1", reason="r", actor="a"), 2)
    stats = Projector(store).project([*bad, good, *bad])
    assert stats.skipped == 6 and stats.projected == 1
    assert store.counts()["skipped"] == 3  # counted once per position
    assert store.positions()[("model.promoted", 1)] == 2


def test_a_new_projection_version_rebuilds_instead_of_migrating(
    store: LineageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    Projector(store).project(
        [record(ModelPromoted(model="m", version="v1", reason="r", actor="a"), 0)]
    )
    assert store.positions()
    monkeypatch.setattr(t, "PROJECTION_VERSION", "999")
    store.ensure()
    assert store.projection_version() == "999"
    assert store.positions() == {} and store.counts()["decisions"] == 0


def test_unknown_names_raise_not_found(store: LineageStore) -> None:
    queries = LineageQueries(store)
    with pytest.raises(NotInLineage):
        queries.upstream("nobody")
    with pytest.raises(NotInLineage):
        queries.downstream("nothing")
    with pytest.raises(NotInLineage):
        queries.why("nobody", "v1")


def test_every_row_carries_its_provenance(store: LineageStore) -> None:
    Projector(store).project(as_log_records(generate_log(500, seed=9)))
    with store.reading() as conn:
        for table in t.PROJECTED:
            if table is t.skipped:
                continue
            nulls = conn.execute(
                sa.select(sa.func.count())
                .select_from(table)
                .where(
                    sa.or_(
                        table.c.topic.is_(None), table.c.offset.is_(None), table.c.time.is_(None)
                    )
                )
            ).scalar()
            assert nulls == 0, table.name


def test_rebuild_swaps_a_fresh_store_in(store: LineageStore) -> None:
    from mlbus.consumers.lineage.store import staging_for, swap_in

    log = as_log_records(generate_log(800, seed=4))
    Projector(store).project(log[:100])
    partial = store.dump_json()
    staging = staging_for(store)
    Projector(staging).project(log)
    assert store.dump_json() == partial  # readers see the old store until the swap
    swap_in(staging, store)
    reopened = LineageStore.open(store.url, schema=store.schema)
    try:
        expected = fresh_store(store)
        Projector(expected).project(log)
        assert reopened.dump_json() == expected.dump_json()
        assert reopened.positions() == expected.positions()
        expected.drop()
        expected.close()
    finally:
        reopened.close()


def test_a_rebuild_is_swapped_in_with_every_index_and_the_live_journal(
    store: LineageStore,
) -> None:
    from mlbus.consumers.lineage.store import staging_for, swap_in

    def indexes(of: LineageStore) -> set[str]:
        with of.reading() as conn:
            inspector = sa.inspect(conn)
            return {
                ix["name"]
                for table in t.metadata.sorted_tables
                for ix in inspector.get_indexes(table.name, schema=of.schema)
            }

    wanted = {ix.name for table in t.metadata.sorted_tables for ix in table.indexes}
    staging = staging_for(store)
    Projector(staging).project(as_log_records(generate_log(300, seed=6)))
    assert indexes(staging) == set()  # projected without them: they are built once, at the end
    swap_in(staging, store)
    reopened = LineageStore.open(store.url, schema=store.schema)
    try:
        assert indexes(reopened) == wanted
        assert LineageQueries(reopened).upstream("model-0") is not None
        if reopened.backend == "sqlite":  # the staging file had no journal; the live one has WAL
            with reopened.reading() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        reopened.close()


def test_a_missing_table_is_an_error_and_a_locked_database_a_transient_one(
    store: LineageStore, tmp_path
) -> None:
    # a missing table: no retry cures it (SQLite says it as an OperationalError)
    with pytest.raises(LineageError, match="no_such_table"), store.reading() as conn:
        conn.exec_driver_sql('SELECT * FROM "no_such_table"')
    # another connection's lock passes: worth a retry
    path = tmp_path / "locked.db"
    locked = LineageStore.open(f"sqlite:///{path}")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        locked.engine.dispose()
        with pytest.raises(TransientError, match="locked"), locked.transaction() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout = 0")
            conn.exec_driver_sql('DELETE FROM "positions"')
    finally:
        holder.close()
        locked.close()
