"""The `mlbus` command, run as users run it: the installed console script in a subprocess,
against the session broker (MLBUS_KAFKA_BOOTSTRAP_SERVERS + a per-test MLBUS_TOPIC_PREFIX),
or against the embedded broker of an `mlbus up` found through MLBUS_DATA_DIR.

What is on a topic is checked with a plain confluent-kafka consumer, not with mlbus code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, Record
from mlbus.schemas.catalog import CATALOG
from mlbus.schemas.codec import encode_new
from mlbus.schemas.datasets import DatasetCreated
from mlbus.schemas.envelope import Event
from tests.mlbus.test_broker import dead_pid, kill_if_alive, pid_alive, wait_gone

# Subprocesses, and brokers of their own (`mlbus up`, `mlbus demo`): never unit tests.
pytestmark = pytest.mark.integration

MLBUS = str(Path(sys.executable).parent / "mlbus")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
WIDE = {"COLUMNS": "250"}  # table output: wide enough that rich does not fold the cells


# -- running the command --------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any MLBUS_ setting or terminal size, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MLBUS_") and k not in ("COLUMNS", "LINES")
    }
    env.update(extra)
    return env


def mlbus(
    *args: str, env: dict[str, str], input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [MLBUS, *args],
            env=env,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`mlbus {' '.join(args)}` did not finish within {timeout:.0f}s\n"
            f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}"
        )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"`{' '.join(result.args[1:])}` exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with one line on stderr (no traceback) that has every fragment."""
    assert result.returncode != 0, f"expected a failure; stdout: {result.stdout!r}"
    stderr = result.stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    flat = " ".join(stderr.split())
    for fragment in fragments:
        assert fragment in flat, f"{fragment!r} not in stderr: {stderr[-3000:]!r}"
    lines = stderr.strip().splitlines()
    shown = stderr if len(lines) <= 12 else "\n".join([*lines[:5], "…", *lines[-5:]])
    assert len(lines) == 1, f"the error is {len(lines)} lines, not one:\n{shown}"
    return lines[0]


def ids_in(stdout: str) -> list[str]:
    ids = stdout.split()
    for event_id in ids:
        assert UUID.match(event_id), f"not an event id: {event_id!r} (stdout: {stdout!r})"
    return ids


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def env(kafka: KafkaConfig, tmp_path: Path) -> dict[str, str]:
    """The CLI pointed at the session broker, with this test's topic prefix."""
    return clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
    )


# -- Kafka without mlbus --------------------------------------------------------------------


def read_topic(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Any]:
    """Every record of `topic`, read with a plain consumer to the end of each partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "unused-" + uuid.uuid4().hex,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
            "log.connection.close": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        assert metadata.error is None, f"{topic}: {metadata.error}"
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        consumer.assign(partitions)
        remaining = {tp.partition for tp in partitions}
        records = []
        deadline = time.monotonic() + timeout
        while remaining:
            if time.monotonic() > deadline:
                pytest.fail(f"partitions {sorted(remaining)} of {topic} not read to the end")
            for message in consumer.consume(500, 0.2):
                error = message.error()
                if error is None:
                    records.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    remaining.discard(message.partition())
                else:
                    pytest.fail(f"reading {topic}: {error.str()}")
        return records
    finally:
        consumer.close()


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> list[Any]:
    """Produce (key, value) records with a plain producer; returns the delivered messages
    (in delivery order, which across partitions is not the order given)."""
    delivered: list[Any] = []

    def on_delivery(error: KafkaError | None, message: Any) -> None:
        assert error is None, error
        delivered.append(message)

    producer = Producer({"bootstrap.servers": bootstrap, "log.connection.close": False})
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=on_delivery)
    assert producer.flush(10) == 0
    assert len(delivered) == len(records)
    return delivered


def topic_names(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False})
    return set(admin.list_topics(timeout=10).topics)


# -- payloads -------------------------------------------------------------------------------


def dataset(name: str = "digits", **changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "name": name,
        "version": "v1",
        "uri": f"file:///data/{name}.parquet",
        "content_hash": "sha256:" + "0" * 64,
        "arrow_schema": [{"name": "x", "type": "int64"}],
        "num_rows": 12,
        "num_bytes": 100,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def valid_record(name: str = "digits") -> bytes:
    _, value = encode_new(DatasetCreated.model_validate(dataset(name)), source="tests/raw")
    return value


# -- publish --------------------------------------------------------------------------------


def test_publish_a_file_prints_the_event_id_and_the_event_is_on_the_topic(
    env: dict[str, str], kafka: KafkaConfig, tmp_path: Path
) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset()))
    result = ok(mlbus("publish", "dataset.created", "--data", str(path), env=env))
    (event_id,) = ids_in(result.stdout)

    shown = ok(
        mlbus("tail", "dataset.created", "--from-beginning", "--json", "--no-follow", env=env)
    )
    (line,) = json_lines(shown.stdout)
    assert line["topic"] == kafka.topic("dataset.created")
    assert line["key"] == "digits"
    event = line["event"]
    assert event["id"] == event_id
    assert event["type"] == "dataset.created"
    assert event["specversion"] == "1.0"
    assert event["data"]["num_rows"] == 12
    assert event["data"]["content_hash"] == "sha256:" + "0" * 64

    (record,) = read_topic(kafka.bootstrap, kafka.topic("dataset.created"))
    assert json.loads(record.value())["id"] == event_id
    assert ("content-type", b"application/cloudevents+json") in (record.headers() or [])


def test_publish_json_lines_from_stdin_publishes_each(
    env: dict[str, str], kafka: KafkaConfig
) -> None:
    lines = "\n".join(json.dumps(dataset(name)) for name in ("a", "b", "c")) + "\n"
    result = ok(mlbus("publish", "dataset.created", "--data", "-", env=env, input=lines))
    ids = ids_in(result.stdout)
    assert len(ids) == 3 and len(set(ids)) == 3

    records = read_topic(kafka.bootstrap, kafka.topic("dataset.created"))
    by_id = {json.loads(r.value())["id"]: r for r in records}
    assert set(by_id) == set(ids)
    assert [by_id[i].key() for i in ids] == [b"a", b"b", b"c"]


def test_publish_a_full_cloudevent_keeps_its_id(env: dict[str, str], kafka: KafkaConfig) -> None:
    event_id = str(uuid.uuid4())
    cloudevent = {
        "specversion": "1.0",
        "id": event_id,
        "type": "dataset.created",
        "source": "etl/nightly",
        "time": "2026-03-01T14:00:00Z",
        "correlationid": "run-42",
        "data": dataset("upstream"),
    }
    result = ok(
        mlbus("publish", "dataset.created", "-d", "-", env=env, input=json.dumps(cloudevent))
    )
    assert ids_in(result.stdout) == [event_id]

    (record,) = read_topic(kafka.bootstrap, kafka.topic("dataset.created"))
    published = json.loads(record.value())
    assert published["id"] == event_id
    assert published["source"] == "etl/nightly"
    assert published["correlationid"] == "run-42"
    assert record.key() == b"upstream"


_INVALID = {
    "missing-field": (json.dumps(dataset(num_rows=None)), ["num_rows"]),
    "wrong-type": (json.dumps(dataset(num_rows="12")), ["num_rows"]),
    "unknown-field": (json.dumps(dataset(rows_total=12)), ["rows_total"]),
    "not-json": ('{"name": "digits", ', ["JSON"]),
    "empty": ("", ["empty"]),
    "blank": ("  \n\n ", ["empty"]),
    "not-an-object": ("[1, 2, 3]", ["object"]),
    "cloudevent-with-bad-data": (
        json.dumps(
            {
                "specversion": "1.0",
                "id": "x1",
                "source": "etl",
                "type": "dataset.created",
                "data": dataset(num_rows="12"),
            }
        ),
        ["num_rows"],
    ),
}


@pytest.mark.parametrize("case", list(_INVALID))
def test_publish_an_invalid_payload_fails_in_one_line_and_publishes_nothing(
    env: dict[str, str], kafka: KafkaConfig, case: str
) -> None:
    text, fragments = _INVALID[case]
    result = mlbus("publish", "dataset.created", "--data", "-", env=env, input=text)
    assert result.returncode == 1
    assert result.stdout.strip() == "", "no event id may be printed"
    one_line_error(result, *fragments)
    assert read_topic(kafka.bootstrap, kafka.topic("dataset.created")) == []


def test_publish_json_lines_with_one_bad_line_publishes_nothing(
    env: dict[str, str], kafka: KafkaConfig
) -> None:
    lines = [
        json.dumps(dataset("a")),
        json.dumps(dataset("b", num_rows="x")),
        json.dumps(dataset()),
    ]
    result = mlbus("publish", "dataset.created", "-d", "-", env=env, input="\n".join(lines))
    assert result.returncode == 1
    assert result.stdout.strip() == ""
    one_line_error(result, "line 2", "num_rows", "nothing was published")
    assert read_topic(kafka.bootstrap, kafka.topic("dataset.created")) == []


def test_publish_to_an_unknown_topic_fails_and_creates_nothing(
    env: dict[str, str], kafka: KafkaConfig, tmp_path: Path
) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset()))
    result = mlbus("publish", "datasets.created", "--data", str(path), env=env)
    assert result.returncode == 1
    one_line_error(result, "unknown topic", "datasets.created")
    assert kafka.topic("datasets.created") not in topic_names(kafka.bootstrap)


def test_publish_a_missing_file_fails_in_one_line(env: dict[str, str], tmp_path: Path) -> None:
    result = mlbus("publish", "dataset.created", "--data", str(tmp_path / "nope.json"), env=env)
    assert result.returncode == 1
    one_line_error(result, "nope.json")


# -- tail -----------------------------------------------------------------------------------


def test_tail_shows_an_invalid_record_raw_with_the_reason(
    env: dict[str, str], kafka: KafkaConfig
) -> None:
    topic = kafka.topic("dataset.created")
    delivered = produce(
        kafka.bootstrap,
        topic,
        [(b"digits", valid_record("digits")), (b"junk", b"this is not an event")],
    )
    good, bad = sorted(delivered, key=lambda m: m.key() != b"digits")
    good_id = json.loads(good.value())["id"]

    shown = ok(
        mlbus("tail", "dataset.created", "--from-beginning", "--json", "--no-follow", env=env)
    )
    lines = {line["key"]: line for line in json_lines(shown.stdout)}
    assert set(lines) == {"digits", "junk"}
    assert lines["digits"]["event"]["id"] == good_id
    assert "invalid" not in lines["digits"]
    invalid = lines["junk"]
    assert "event" not in invalid
    assert invalid["raw"] == "this is not an event"
    assert "JSON" in invalid["invalid"]
    assert (invalid["topic"], invalid["partition"], invalid["offset"]) == (
        topic,
        bad.partition(),
        bad.offset(),
    )

    table = ok(mlbus("tail", "dataset.created", "--from-beginning", "--no-follow", env=env | WIDE))
    (bad_line,) = [line for line in table.stdout.splitlines() if "junk" in line]
    assert "INVALID" in bad_line
    assert "this is not an event" in bad_line
    assert "JSON" in bad_line
    (good_line,) = [line for line in table.stdout.splitlines() if good_id in line]
    assert "INVALID" not in good_line


def test_tail_max_stops_after_n_records(env: dict[str, str], kafka: KafkaConfig) -> None:
    produce(
        kafka.bootstrap,
        kafka.topic("dataset.created"),
        [(name.encode(), valid_record(name)) for name in ("a", "b", "c")],
    )
    # Following (the default): without --max this would wait for more records forever.
    shown = ok(
        mlbus("tail", "dataset.created", "--from-beginning", "--json", "--max", "2", env=env)
    )
    lines = json_lines(shown.stdout)
    assert len(lines) == 2
    assert {line["key"] for line in lines} < {"a", "b", "c"}


def test_tail_of_an_unknown_topic_fails_in_one_line(env: dict[str, str]) -> None:
    result = mlbus("tail", "no.such.topic", "--no-follow", env=env)
    one_line_error(result, "no.such.topic")


# -- deadletters ----------------------------------------------------------------------------


def test_deadletters_shows_where_a_record_came_from_and_why(
    env: dict[str, str], kafka: KafkaConfig, group: str
) -> None:
    topic = kafka.topic("dataset.created")
    (bad,) = produce(
        kafka.bootstrap, topic, [(b"k", b'{"specversion": "1.0", "type": "dataset.created"}')]
    )
    handled: list[Event] = []

    def on_dataset(event: Event, record: Record) -> None:
        handled.append(event)

    stats = ConsumerLoop(
        kafka, group=group, handlers={"dataset.created": on_dataset}, name="cli-test"
    ).run(stop_at_end=True, install_signal_handlers=False)
    assert (stats.deadlettered, handled) == (1, [])

    shown = ok(mlbus("deadletters", "--json", env=env))
    (line,) = json_lines(shown.stdout)
    assert line["topic"] == kafka.topic("mlbus.deadletter")
    letter = line["event"]["data"]
    original = letter["original"]
    assert (original["topic"], original["partition"], original["offset"]) == (
        topic,
        bad.partition(),
        bad.offset(),
    )
    assert "id" in letter["reason"] and "required" in letter["reason"]
    assert letter["consumer_group"] == group
    assert letter["consumer"] == "cli-test"

    table = ok(mlbus("deadletters", env=env | WIDE))
    assert f"{topic}/{bad.partition()}@{bad.offset()}" in table.stdout
    assert letter["reason"].split(";")[0] in table.stdout
    assert "no dead letters" not in table.stdout


def test_deadletters_says_when_there_are_none(env: dict[str, str]) -> None:
    table = ok(mlbus("deadletters", env=env))
    assert "no dead letters" in table.stdout
    assert ok(mlbus("deadletters", "--json", env=env)).stdout.strip() == ""


# -- topics ---------------------------------------------------------------------------------


def _table_rows(stdout: str) -> dict[str, list[str]]:
    """topic → its cells, from a rich table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0]:
            rows[cells[0]] = cells
    return rows


def test_topics_apply_is_idempotent(broker: KafkaConfig, tmp_path: Path) -> None:
    kafka = replace(broker, topic_prefix=f"t{uuid.uuid4().hex[:10]}.")
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        MLBUS_TOPIC_PREFIX=kafka.topic_prefix,
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        **WIDE,
    )
    names = [kafka.topic(spec.name) for spec in CATALOG]

    first = _table_rows(ok(mlbus("topics", "apply", env=env)).stdout)
    assert {name: first[name][1] for name in names} == dict.fromkeys(names, "created")
    assert names[0] in topic_names(kafka.bootstrap)

    second = _table_rows(ok(mlbus("topics", "apply", env=env)).stdout)
    assert {name: second[name][1] for name in names} == dict.fromkeys(names, "ok")

    listed = json_lines(ok(mlbus("topics", "list", "--json", env=env)).stdout)
    assert [line["topic"] for line in listed] == names
    assert all(line["status"] == "ok" for line in listed), listed
    assert [line["partitions"] for line in listed] == [spec.partitions for spec in CATALOG]


def test_topics_list_reports_missing_topics(broker: KafkaConfig, tmp_path: Path) -> None:
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
        MLBUS_TOPIC_PREFIX=f"t{uuid.uuid4().hex[:10]}.",
        MLBUS_DATA_DIR=str(tmp_path / "data"),
    )
    listed = json_lines(ok(mlbus("topics", "list", "--json", env=env)).stdout)
    assert len(listed) == len(CATALOG)
    assert {line["status"] for line in listed} == {"missing"}


# -- configuration errors -------------------------------------------------------------------


def test_no_cluster_and_no_mlbus_up_says_how_to_start_one(tmp_path: Path) -> None:
    env = clean_env(MLBUS_DATA_DIR=str(tmp_path / "data"))
    result = mlbus("tail", "dataset.created", "--no-follow", env=env)
    assert result.returncode == 1
    one_line_error(result, "mlbus up", "MLBUS_KAFKA_BOOTSTRAP_SERVERS")


def test_a_stale_broker_json_is_treated_as_no_broker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "broker.json").write_text(json.dumps({"bootstrap": "127.0.0.1:9", "pid": dead_pid()}))
    result = mlbus(
        "tail", "dataset.created", "--no-follow", env=clean_env(MLBUS_DATA_DIR=str(data))
    )
    assert result.returncode == 1
    one_line_error(result, "mlbus up")


def test_an_unreachable_cluster_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_env(
        MLBUS_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", MLBUS_DATA_DIR=str(tmp_path / "data")
    )
    result = mlbus("tail", "dataset.created", "--no-follow", env=env)
    assert result.returncode == 1
    one_line_error(result, "cannot reach Kafka", f"127.0.0.1:{port}")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MLBUS_KAFKA_BOOTSTRAP_SERVERS", "nonsense"),
        ("MLBUS_MAX_EVENT_BYTES", "abc"),
        ("MLBUS_LOG_LEVEL", "LOUD"),
        ("MLBUS_METADATA_URL", "mysql://db/mlbus"),
        ("MLBUS_KAFKA", "not json"),
    ],
)
def test_a_wrong_setting_fails_with_one_line_naming_it_and_exit_code_2(
    tmp_path: Path, name: str, value: str
) -> None:
    env = clean_env(MLBUS_DATA_DIR=str(tmp_path / "data"), **{name: value})
    result = mlbus("tail", "dataset.created", "--no-follow", env=env)
    line = one_line_error(result, name)
    assert result.returncode == 2, f"exit code {result.returncode}: {line}"


def test_settings_shows_the_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    env = clean_env(
        MLBUS_DATA_DIR=str(tmp_path / "data"),
        MLBUS_KAFKA__SASL_USERNAME="alice",
        MLBUS_KAFKA__SASL_PASSWORD="kafka-pass-1",
        MLBUS_METADATA_URL="postgresql://mlbus:db-pass-2@db:5432/mlbus",
    )
    result = ok(mlbus("settings", env=env))
    assert "kafka-pass-1" not in result.stdout and "db-pass-2" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["kafka"] == {"sasl.username": "alice", "sasl.password": "***"}
    assert shown["metadata_url"] == "postgresql+psycopg://mlbus:***@db:5432/mlbus"
    assert shown["data_dir"] == str(tmp_path / "data")


def test_verify_full_is_a_global_option_and_a_setting(tmp_path: Path) -> None:
    env = clean_env(MLBUS_DATA_DIR=str(tmp_path / "data"))
    assert json.loads(ok(mlbus("settings", env=env)).stdout)["verify"] == "cached"
    shown = json.loads(ok(mlbus("--verify", "full", "settings", env=env)).stdout)
    assert shown["verify"] == "full"
    from_env = json.loads(ok(mlbus("settings", env=env | {"MLBUS_VERIFY": "full"})).stdout)
    assert from_env["verify"] == "full"
    result = mlbus("--verify", "sometimes", "settings", env=env)
    one_line_error(result, "MLBUS_VERIFY", "cached", "full")
    assert result.returncode == 2


# -- mlbus up -------------------------------------------------------------------------------


class Up:
    """An `mlbus up` subprocess on `data_dir` with no cluster configured."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.env = clean_env(MLBUS_DATA_DIR=str(data_dir), **env)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.broker_pid: int | None = None
        # One light service: these tests are about the broker and the process's life.
        self.proc = subprocess.Popen(
            [MLBUS, "up", "--only", "validator"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def output(self) -> str:
        return f"stdout:\n{''.join(self.stdout)}\nstderr:\n{''.join(self.stderr)}"

    def wait_up(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for "mlbus is up"; returns broker.json."""
        deadline = time.monotonic() + timeout
        while not any("mlbus is up" in line for line in self.stdout):
            if self.proc.poll() is not None:
                pytest.fail(f"mlbus up exited with {self.proc.returncode}\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlbus up did not come up within {timeout:.0f}s\n{self.output()}")
            time.sleep(0.05)
        state = json.loads((self.data_dir / "broker.json").read_text())
        self.broker_pid = int(state["pid"])
        return state

    def stop(self, sig: signal.Signals, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mlbus up did not stop within {timeout:.0f}s of {sig.name}")
        for reader in self._readers:
            reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        kill_if_alive(self.broker_pid)


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Any]:
    started: list[Up] = []

    def start(data_dir: Path = tmp_path / "data", **env: str) -> Up:
        up = Up(data_dir, **env)
        started.append(up)
        return up

    yield start
    for up in started:
        up.close()


def test_up_serves_other_commands_through_the_data_dir(start_up: Any, tmp_path: Path) -> None:
    up = start_up()
    state = up.wait_up()
    bootstrap = state["bootstrap"]
    assert pid_alive(up.broker_pid)
    assert {spec.name for spec in CATALOG} <= topic_names(bootstrap)

    # Another command with the same data dir and no cluster configured finds that broker.
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(dataset()))
    (event_id,) = ids_in(
        ok(mlbus("publish", "dataset.created", "-d", str(path), env=up.env)).stdout
    )
    shown = ok(
        mlbus("tail", "dataset.created", "--from-beginning", "--json", "--no-follow", env=up.env)
    )
    assert [line["event"]["id"] for line in json_lines(shown.stdout)] == [event_id]
    assert [json.loads(r.value())["id"] for r in read_topic(bootstrap, "dataset.created")] == [
        event_id
    ]

    assert up.stop(signal.SIGINT) == 0, up.output()
    assert not (up.data_dir / "broker.json").exists()
    wait_gone(up.broker_pid, what="the broker of a stopped `mlbus up`")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_stops_cleanly_on_a_signal(start_up: Any, sig: signal.Signals) -> None:
    up = start_up()
    up.wait_up()
    assert pid_alive(up.broker_pid)
    code = up.stop(sig)
    assert code == 0, f"exit code {code} after {sig.name}\n{up.output()}"
    assert "embedded broker stopped" in "".join(up.stdout)
    assert "Traceback" not in "".join(up.stderr)
    assert not (up.data_dir / "broker.json").exists()
    wait_gone(up.broker_pid, what=f"the broker of an `mlbus up` stopped by {sig.name}")


def test_up_without_a_journal_exits_non_zero_when_its_broker_dies(start_up: Any) -> None:
    """Nothing could be restored into a new broker: the platform stops (with a journal, a
    new broker is put in place: tests/mlbus/journal/test_broker_loss.py)."""
    up = start_up(MLBUS_JOURNAL__ENABLED="false")
    up.wait_up()
    os.kill(up.broker_pid, signal.SIGKILL)
    try:
        code = up.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mlbus up kept running after its broker died\n{up.output()}")
    for reader in up._readers:
        reader.join(5)
    assert code == 1, up.output()
    assert "broker exited" in " ".join("".join(up.stdout).split()), up.output()
    assert not (up.data_dir / "broker.json").exists()


def test_a_killed_broker_is_replaced_behind_the_same_address(start_up: Any) -> None:
    up = start_up()
    state = up.wait_up()
    os.kill(state["pid"], signal.SIGKILL)
    wait_gone(state["pid"], what="the broker")
    deadline = time.monotonic() + 30
    while (again := _state(up.data_dir)).get("pid") in (None, state["pid"]):
        if time.monotonic() > deadline or up.proc.poll() is not None:
            pytest.fail(f"no new broker behind the gate\n{up.output()}")
        time.sleep(0.1)
    assert again["bootstrap"] == state["bootstrap"] and again["origin"] != state["origin"]
    assert pid_alive(again["pid"])
    assert {spec.name for spec in CATALOG} <= topic_names(again["bootstrap"])
    assert up.stop(signal.SIGTERM) == 0, up.output()


def _state(data_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((data_dir / "broker.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_sigkill_of_up_leaves_no_broker_and_a_new_up_starts(start_up: Any) -> None:
    first = start_up()
    first.wait_up()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    wait_gone(first.broker_pid, what="the broker of a SIGKILLed `mlbus up`")
    # Once init reaped it (a zombie is test_broker.py's concern), broker.json is stale: it
    # names a dead process, and nobody uses or fears it.
    deadline = time.monotonic() + 15
    while Path(f"/proc/{first.broker_pid}").exists():
        if time.monotonic() > deadline:
            pytest.fail(f"init did not reap the dead broker {first.broker_pid} within 15s")
        time.sleep(0.05)
    result = mlbus("tail", "dataset.created", "--no-follow", env=first.env)
    assert result.returncode == 1 and "mlbus up" in result.stderr, result.stderr
    second = start_up()
    state = second.wait_up()
    assert state["pid"] != first.broker_pid
    assert second.stop(signal.SIGTERM) == 0
    wait_gone(second.broker_pid)


def test_the_cli_starts_without_the_heavy_libraries_of_a_few_commands() -> None:
    # FastAPI (the control plane), pyarrow (archive, demo), httpx (demo) and torch are
    # imported by the commands that use them, not by every `mlbus` invocation.
    heavy = ("fastapi", "pyarrow", "httpx", "torch", "uvicorn")
    code = f"import sys, mlbus.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
