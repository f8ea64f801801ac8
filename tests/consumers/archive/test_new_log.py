"""The archive on a new log (topics recreated, or a broker back with an empty log): the
archiver stops with `NewLog` by default, and when told to go on it retires the old log's
files of each partition under `log=<id>/` before archiving the new log from offset 0, so the
current file sequence never splices two logs. The same log, or a byte-identical copy of it,
resumes where the files end."""

from __future__ import annotations

from collections import Counter

import pytest

from mlbus.consumers.archive.layout import ROOT, ArchiveFile, list_files, retire, retired_logs
from mlbus.consumers.archive.reader import read_archive
from mlbus.consumers.archive.writer import Archiver, last_record
from mlbus.kafka.anchor import NewLog
from mlbus.kafka.config import KafkaConfig
from mlbus.storage import ObjectStore
from tests.consumers.archive.support import TOPICS_USED, fill_log, ordered, stored_rows, the_log
from tests.mlbus.kafka.support import copy_log, new_log, recreate_topics
from tests.mlbus.test_cli import mlbus, ok

pytestmark = pytest.mark.integration


def archive(kafka: KafkaConfig, store: ObjectStore, group: str, **kwargs: object) -> Archiver:
    archiver = Archiver(
        kafka,
        store,
        group=group,
        topics=TOPICS_USED,
        **kwargs,  # type: ignore[arg-type]
    )
    archiver.run(stop_at_end=True, install_signal_handlers=False)
    return archiver


def retired(store: ObjectStore) -> list:
    """Every record of every retired log, read back through the reader."""
    return ordered(
        r
        for t in TOPICS_USED
        for log in retired_logs(store, t)
        for r in read_archive(store, [t], log=log)
    )


@pytest.mark.parametrize("how", ["recreated", "new prefix"])
def test_a_new_log_stops_the_archiver_by_default_and_leaves_the_archive_alone(
    kafka, store, group, how
):
    fill_log(kafka, 30)
    archive(kafka, store, group)
    old = the_log(kafka, TOPICS_USED)
    keys = store.list(ROOT)

    if how == "recreated":
        recreate_topics(kafka, TOPICS_USED)
        fresh = kafka
    else:
        fresh = new_log(kafka)
    fill_log(fresh, 40)
    with pytest.raises(NewLog, match=r"is a new log.*ON_NEW_LOG=rebuild.*ON_NEW_LOG=restart") as e:
        archive(fresh, store, group)
    assert e.value.topic in TOPICS_USED
    assert store.list(ROOT) == keys
    assert ordered(read_archive(store, TOPICS_USED)) == old


@pytest.mark.parametrize(("choice", "size"), [("rebuild", 45), ("restart", 4)])
def test_told_to_go_on_it_retires_the_old_log_and_archives_the_new_one_from_offset_0(
    kafka, store, group, choice, size
):
    fill_log(kafka, 30)
    archive(kafka, store, group)
    old = the_log(kafka, TOPICS_USED)

    fresh = new_log(kafka)
    fill_log(fresh, size)
    archiver = archive(fresh, store, group, on_new_log=choice)
    new = the_log(fresh, TOPICS_USED)
    assert archiver.stats.retired > 0 and archiver.loop.stats.new_logs > 0
    assert ordered(read_archive(store, TOPICS_USED)) == new  # the new log only, from offset 0
    rows = stored_rows(store)
    assert not [row for row, n in Counter(rows).items() if n > 1]
    assert len(rows) == len(new)
    assert retired(store) == old  # the old log whole, beside it
    for name in TOPICS_USED:  # one retired log per partition of the old log
        logs = retired_logs(store, name)
        partitions = [{f.partition for f in files} for files in logs.values()]
        assert all(len(p) == 1 for p in partitions)
        assert len(logs) == len({r.partition for r in old if r.topic == name})

    # now it is the archive's log: a restart resumes, retiring nothing more
    fill_log(fresh, 3)
    again = archive(fresh, store, group, on_new_log=choice)
    assert again.stats.retired == 0 and again.stats.records == len(
        the_log(fresh, TOPICS_USED)
    ) - len(new)
    assert ordered(read_archive(store, TOPICS_USED)) == the_log(fresh, TOPICS_USED)
    assert retired(store) == old


def test_a_retirement_cut_short_is_finished_under_the_same_id(kafka, store, group):
    fill_log(kafka, 15)
    archive(kafka, store, group)
    fill_log(kafka, 15)
    archive(kafka, store, group)  # two files in most partitions
    old = the_log(kafka, TOPICS_USED)
    fresh = new_log(kafka)
    fill_log(fresh, 20)
    by_partition: dict[tuple[str, int], list[ArchiveFile]] = {}
    for f in list_files(store, TOPICS_USED):
        by_partition.setdefault((f.topic, f.partition), []).append(f)
    files = max(by_partition.values(), key=len)
    assert len(files) > 1
    log_id = last_record(store, files[-1]).digest[:16]  # the id the archiver will choose
    retire(store, files[:1], log_id)  # the oldest file moved, then a crash

    archive(fresh, store, group, on_new_log="restart")
    assert retired(store) == old
    assert [(f.first, f.last) for f in retired_logs(store, files[0].topic)[log_id]] == [
        (f.first, f.last) for f in files
    ]
    assert ordered(read_archive(store, TOPICS_USED)) == the_log(fresh, TOPICS_USED)


def test_the_same_log_and_a_byte_identical_copy_of_it_resume_where_the_files_end(
    kafka, store, group
):
    fill_log(kafka, 30)
    archive(kafka, store, group)
    fill_log(kafka, 5)
    again = archive(kafka, store, group)
    assert again.stats.records == 5 * 3 + 3 and again.stats.skipped == 0

    copy = new_log(kafka)
    copied = copy_log(kafka, copy, TOPICS_USED)
    assert copied == len(the_log(kafka, TOPICS_USED))
    fill_log(copy, 2)
    resumed = archive(copy, store, group)  # fails if the copy were taken for a new log
    assert resumed.stats.retired == 0 and resumed.loop.stats.new_logs == 0
    assert resumed.stats.records == 2 * 3 + 3
    assert ordered(read_archive(store, TOPICS_USED)) == the_log(copy, TOPICS_USED)
    assert not any(retired_logs(store, t) for t in TOPICS_USED)


def test_mlbus_archive_run_stops_with_the_error_and_the_setting_makes_the_choice(
    kafka, local, cli_env
):
    fill_log(kafka, 10)
    ok(mlbus("archive", "run", "--until-end", "--group", "cli", env=cli_env))
    old = the_log(kafka, TOPICS_USED)
    recreate_topics(kafka, TOPICS_USED)
    fill_log(kafka, 12)

    failed = mlbus("archive", "run", "--until-end", "--group", "cli", env=cli_env)
    assert failed.returncode != 0
    assert "is a new log" in failed.stderr and "MLBUS_POSITIONS__ON_NEW_LOG" in failed.stderr
    assert ordered(read_archive(local, TOPICS_USED)) == old

    told = cli_env | {"MLBUS_POSITIONS__ON_NEW_LOG": "restart"}
    ok(mlbus("archive", "run", "--until-end", "--group", "cli", env=told))
    assert ordered(read_archive(local, TOPICS_USED)) == the_log(kafka, TOPICS_USED)
    assert retired(local) == old
