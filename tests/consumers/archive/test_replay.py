"""`mlbus replay`: the same records from Kafka and from the archive, filtered by time and
key correctly on a broker whose offsets_for_times is broken (docs/broker.md), in every
format, without joining a group or moving anybody's offsets."""

from __future__ import annotations

import json
import time
import uuid

import pyarrow.parquet as pq
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from mlbus.cli import app
from mlbus.cli.archive import parse_time
from mlbus.consumers.archive.writer import Archiver
from tests.consumers.archive.support import produce
from tests.mlbus.kafka.support import committed_offset
from tests.mlbus.test_cli import json_lines, mlbus, ok

HOUR = 3600 * 1000
NOW = int(time.time() * 1000)
# (key, hours ago) — partitions interleave old and new records, so a reader starting at
# offset 0 (what offsets_for_times answers here) must skip by timestamp, record by record.
SCHEDULE = [("a", 72), ("b", 50), ("a", 30), ("c", 26), ("b", 20), ("a", 5), ("c", 1), ("b", 80)]


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def fill(kafka) -> list[dict]:
    events = []
    for i, (key, hours) in enumerate(SCHEDULE):
        event = {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "type": "model.promoted",
            "source": "test",
            "data": {"n": i},
        }
        produce(
            kafka,
            "model.promoted",
            [(key.encode(), json.dumps(event).encode(), NOW - hours * HOUR)],
        )
        events.append({"key": key, "ts": NOW - hours * HOUR, "event": event})
    return events


def archive_all(kafka, store) -> None:
    Archiver(kafka, store, group="archiver").run(stop_at_end=True, install_signal_handlers=False)


def replay(env, *args: str) -> list[dict]:
    """`mlbus replay model.promoted ARGS` in this process (the command's own process is
    tested below; starting one per case would cost seconds each)."""
    result = CliRunner().invoke(app, ["replay", "model.promoted", *args], env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return json_lines(result.stdout)


def ids(lines: list[dict]) -> list[str]:
    return sorted(line["event"]["id"] for line in lines)


def test_kafka_and_archive_give_the_same_records_and_filters(kafka, local, cli_env):
    events = fill(kafka)
    archive_all(kafka, local)
    cases = {
        (): lambda e: True,
        ("--since", "2d"): lambda e: e["ts"] >= NOW - 48 * HOUR - 60_000,
        ("--since", iso(NOW - 30 * HOUR), "--until", iso(NOW - 5 * HOUR)): lambda e: (
            NOW - 30 * HOUR <= e["ts"] <= NOW - 5 * HOUR
        ),
        ("--until", iso(NOW - 50 * HOUR)): lambda e: e["ts"] <= NOW - 50 * HOUR,
        ("--key", "b"): lambda e: e["key"] == "b",
        ("--key", "a", "--since", "40h"): lambda e: e["key"] == "a" and e["ts"] > NOW - 40 * HOUR,
    }
    for args, wanted in cases.items():
        expected = sorted(e["event"]["id"] for e in events if wanted(e))
        from_kafka = replay(cli_env, *args)
        from_archive = replay(cli_env, *args, "--source", "archive")
        assert ids(from_kafka) == expected, args
        key = lambda line: (line["partition"], line["offset"])  # noqa: E731
        assert sorted(from_kafka, key=key) == sorted(from_archive, key=key), args
    line = replay(cli_env, "--key", "c", "--since", "2h")[0]
    assert set(line) == {"topic", "partition", "offset", "timestamp", "key", "event"}
    assert line["topic"] == "model.promoted" and line["key"] == "c"
    assert parse_time(line["timestamp"]) == NOW - 1 * HOUR
    assert line["event"] == events[6]["event"]


def test_replay_joins_no_group_and_moves_no_offsets(kafka, local, cli_env):
    fill(kafka)
    archive_all(kafka, local)  # a group with committed offsets to watch
    topic = kafka.topic("model.promoted")
    before = [committed_offset(kafka, "archiver", topic, p) for p in range(3)]
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    groups = {g.group_id for g in admin.list_consumer_groups().result(10).valid}
    for source in ("kafka", "archive"):  # as users run it: the command in its own process
        ok(mlbus("replay", "model.promoted", "--source", source, "--since", "1d", env=cli_env))
    assert {g.group_id for g in admin.list_consumer_groups().result(10).valid} == groups
    assert [committed_offset(kafka, "archiver", topic, p) for p in range(3)] == before
    assert sum(o or 0 for o in before) == len(SCHEDULE)
    # the placeholder group.id of group-less readers holds no position either
    reader = "mlbus-reader-unused"
    assert committed_offset(kafka, reader, topic, 0) is None


def test_parquet_and_table_formats(kafka, local, cli_env, tmp_path):
    events = fill(kafka)
    out = tmp_path / "replay.parquet"
    result = ok(
        mlbus(
            "replay",
            "model.promoted",
            "--format",
            "parquet",
            "--output",
            str(out),
            "--key",
            "a",
            env=cli_env,
        )
    )
    assert "3 records" in result.stdout
    table = pq.read_table(out)
    assert sorted(table.column("event_id").to_pylist()) == sorted(
        e["event"]["id"] for e in events if e["key"] == "a"
    )
    assert set(table.column("key").to_pylist()) == {b"a"}
    wide = cli_env | {"COLUMNS": "250"}
    shown = CliRunner().invoke(app, ["replay", "model.promoted", "--format", "table"], env=wide)
    assert shown.exit_code == 0, shown.output
    shown = shown.stdout
    assert all(e["event"]["id"] in shown for e in events)
    refused = CliRunner().invoke(
        app, ["replay", "model.promoted", "--format", "parquet"], env=cli_env
    )
    assert refused.exit_code == 1 and "--output" in str(refused.exception)
    unknown = CliRunner().invoke(app, ["replay", "no.such.topic"], env=cli_env)
    assert unknown.exit_code == 1 and "unknown topic" in str(unknown.exception)


def test_time_arguments():
    now = parse_time("2026-03-01T14:00:00Z")
    assert now == parse_time("2026-03-01T14:00:00") == parse_time("2026-03-01T15:00:00+01:00")
    from datetime import UTC, datetime

    at = datetime(2026, 3, 1, 14, tzinfo=UTC)
    assert parse_time("2h", now=at) == now - 2 * HOUR
    assert parse_time("3d", now=at) == now - 72 * HOUR
    assert parse_time("90s", now=at) == now - 90_000
