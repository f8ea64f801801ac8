"""The lineage projector on a new log (topics recreated, or a broker back with an empty log),
on both SQL backends: it stops with `NewLog` by default; told to rebuild, the store ends as a
rebuild from the new log alone; told to restart, it keeps its rows and projects the new log
from offset 0. The same log, or a byte-identical copy of it, resumes where the store is; a
store made before positions kept anchors gets the columns and keeps its rows."""

from __future__ import annotations

import contextlib

import orjson
import pytest
import sqlalchemy as sa

from mlbus.consumers.lineage import tables as t
from mlbus.consumers.lineage.live import LiveProjector
from mlbus.consumers.lineage.projector import TOPICS
from mlbus.consumers.lineage.store import LineageStore
from mlbus.kafka.anchor import NewLog, Position
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.reader import read_log
from tests.consumers.lineage.conftest import rebuilt_store
from tests.consumers.lineage.generator import generate_log, lineage_topics_only, produce
from tests.mlbus.kafka.support import copy_log, new_log

pytestmark = pytest.mark.integration


def project(kafka: KafkaConfig, store: LineageStore, group: str, **kwargs: object) -> LiveProjector:
    projector = LiveProjector(kafka, store, group=group, batch_size=300, **kwargs)  # type: ignore[arg-type]
    projector.run(stop_at_end=True, install_signal_handlers=False)
    return projector


def event_ids(store: LineageStore) -> set[str]:
    with store.reading() as conn:
        return set(conn.execute(sa.select(t.events.c.id)).scalars())


def ids_in(kafka: KafkaConfig) -> set[str]:
    found = set()
    for record in read_log(kafka, TOPICS):
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
            found.add(orjson.loads(record.value)["id"])
    return found


def more(kafka: KafkaConfig, n: int, seed: int) -> int:
    """`n` more generated records on the log; how many of them the projector reads."""
    records = generate_log(n, seed=seed)
    produce(kafka, records)
    return lineage_topics_only(records, TOPICS)


def old_log(kafka: KafkaConfig, store: LineageStore, group: str) -> bytes:
    produce(kafka, generate_log(1500, seed=3))
    project(kafka, store, group)
    return store.dump_json()


def test_a_new_log_stops_the_projector_by_default_and_leaves_the_store_alone(kafka, store, group):
    before = old_log(kafka, store, group)
    positions = store.anchored_positions()
    fresh = new_log(kafka)
    produce(fresh, generate_log(2500, seed=4))
    with pytest.raises(NewLog, match=r"is a new log.*ON_NEW_LOG=rebuild.*ON_NEW_LOG=restart") as e:
        project(fresh, store, group)
    assert (e.value.topic, e.value.partition) in positions
    assert store.dump_json() == before
    assert store.anchored_positions() == positions


@pytest.mark.parametrize("size", [300, 2500], ids=["shorter", "longer"])
def test_told_to_rebuild_the_store_is_the_new_logs_alone(kafka, store, group, size):
    old_log(kafka, store, group)
    fresh = new_log(kafka)
    produce(fresh, generate_log(size, seed=4))
    projector = project(fresh, store, group, on_new_log="rebuild")
    assert projector.rebuilds == 1

    expected = rebuilt_store(store, read_log(fresh, TOPICS))
    try:
        assert store.dump_json() == expected.dump_json()  # nothing of the old log
        assert store.anchored_positions() == expected.anchored_positions()
    finally:
        expected.drop()
        expected.close()
    assert event_ids(store) == ids_in(fresh)

    again = project(fresh, store, group, on_new_log="rebuild")  # its log now: resumes
    assert again.rebuilds == 0 and again.stats.records == 0


def test_told_to_restart_it_keeps_its_rows_and_projects_the_new_log_from_offset_0(
    kafka, store, group
):
    old_log(kafka, store, group)
    old_ids = event_ids(store)
    fresh = new_log(kafka)
    produce(fresh, generate_log(800, seed=5))
    projector = project(fresh, store, group, on_new_log="restart")
    assert projector.loop.stats.new_logs > 0
    assert event_ids(store) == old_ids | ids_in(fresh)  # every record of the new log
    expected = rebuilt_store(store, read_log(fresh, TOPICS))
    try:  # positions (and anchors) are the new log's, as a rebuild from it has them
        assert store.anchored_positions() == expected.anchored_positions()
    finally:
        expected.drop()
        expected.close()

    added = more(fresh, 100, seed=6)
    again = project(fresh, store, group, on_new_log="restart")
    assert again.loop.stats.new_logs == 0 and again.stats.records == added


def test_the_same_log_and_a_byte_identical_copy_resume_where_the_store_is(kafka, store, group):
    old_log(kafka, store, group)
    added = more(kafka, 200, seed=7)
    resumed = project(kafka, store, group)
    assert resumed.stats.records == added  # the new records, not the whole log again

    copy = new_log(kafka)
    copy_log(kafka, copy, TOPICS)
    added = more(copy, 100, seed=8)
    resumed = project(copy, store, group)  # NewLog if the copy were taken for a new log
    assert resumed.stats.records == added
    assert event_ids(store) == ids_in(copy)


def test_a_store_made_before_anchors_gets_the_columns_and_keeps_its_rows(kafka, store, group):
    before = old_log(kafka, store, group)
    positions = store.positions()
    # the store as it was made before anchors: its positions table without the columns
    with store.transaction() as conn:
        conn.execute(sa.delete(t.positions))
        conn.exec_driver_sql(f"DROP TABLE {store.qualified(t.positions)}")
        conn.exec_driver_sql(
            f'CREATE TABLE {store.qualified(t.positions)} ("topic" VARCHAR NOT NULL, '
            f'"partition" INTEGER NOT NULL, "next_offset" BIGINT NOT NULL, '
            f'PRIMARY KEY ("topic", "partition"))'
        )
        conn.execute(
            sa.insert(
                sa.table(
                    "positions",
                    sa.column("topic"),
                    sa.column("partition"),
                    sa.column("next_offset"),
                    schema=store.schema,
                )
            ),
            [{"topic": tp, "partition": p, "next_offset": n} for (tp, p), n in positions.items()],
        )
    reopened = LineageStore.open(store.url, schema=store.schema)
    try:
        assert reopened.dump_json() == before
        assert reopened.anchored_positions() == {k: Position(n) for k, n in positions.items()}
        added = more(kafka, 100, seed=9)
        resumed = project(kafka, reopened, group)  # unanchored: assumed to be this log
        assert resumed.stats.records == added
        anchored = reopened.anchored_positions()
        assert all(p.anchor is not None for k, p in anchored.items() if p.next != positions.get(k))
    finally:
        reopened.close()
