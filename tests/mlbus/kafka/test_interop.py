"""Interop with Kafka clients that know nothing of mlbus (docs/architecture.md, "Who uses it"): an
upstream system producing a JSON CloudEvent with a plain client or `kcat` is handled as a typed
event and shown by `mlbus tail`; what mlbus publishes reads as plain JSON in `kcat`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import confluent_kafka
import pytest

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop
from mlbus.kafka.producer import EventProducer
from tests.mlbus.kafka.support import (
    SHA,
    Recorder,
    dataset,
    dead_letters,
    produce_raw,
    run_to_end,
)

# What an upstream ETL job writes by hand: a CloudEvent as JSON text, no mlbus involved.
UPSTREAM_EVENT = {
    "specversion": "1.0",
    "id": "etl-2026-11-21-digits",
    "source": "etl/nightly",
    "type": "dataset.created",
    "time": "2026-11-21T12:00:00Z",
    "subject": "digits@v7",
    "datacontenttype": "application/json",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # an extension
    "data": {
        "name": "digits",
        "version": "v7",
        "uri": "s3://lake/digits/v7.parquet",
        "content_hash": SHA,
        "arrow_schema": [{"name": "pixel0", "type": "double"}, {"name": "label", "type": "int64"}],
        "num_rows": 1797,
        "num_bytes": 123456,
        "label_column": "label",
    },
}


def _assert_is_the_upstream_event(event) -> None:  # type: ignore[no-untyped-def]
    assert type(event).__name__ == "DatasetCreatedEvent"
    assert (event.id, event.source, event.subject) == (
        "etl-2026-11-21-digits",
        "etl/nightly",
        "digits@v7",
    )
    assert event.data.num_rows == 1797 and event.data.label_column == "label"
    assert [c.name for c in event.data.arrow_schema] == ["pixel0", "label"]
    assert event.model_extra == {"traceparent": UPSTREAM_EVENT["traceparent"]}


def test_plain_client_cloudevent_is_handled_as_a_typed_event(kafka, group):
    produce_raw(kafka, kafka.topic("dataset.created"), json.dumps(UPSTREAM_EVENT), key="digits")
    handled = Recorder()
    stats = run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": handled}))
    assert stats.deadlettered == 0, dead_letters(kafka)
    [event] = handled.events
    _assert_is_the_upstream_event(event)


def _mlbus(kafka: KafkaConfig, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the `mlbus` command of this environment against the test's broker and topics."""
    executable = Path(sys.executable).parent / "mlbus"
    assert executable.exists(), f"{executable} is missing: run `make install`"
    env = os.environ | {
        "MLBUS_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
        "MLBUS_TOPIC_PREFIX": kafka.topic_prefix,
        "MLBUS_DATA_DIR": str(tmp_path / "mlbus-data"),
    }
    done = subprocess.run(
        [str(executable), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"mlbus {' '.join(args)} failed:\n{done.stderr}"
    return done


def test_mlbus_tail_shows_a_plain_client_event_decoded(kafka, tmp_path):
    good = produce_raw(
        kafka, kafka.topic("dataset.created"), json.dumps(UPSTREAM_EVENT), key="digits"
    )
    bad = produce_raw(kafka, kafka.topic("dataset.created"), "rows=1797", key="digits")

    done = _mlbus(
        kafka, tmp_path, "tail", "dataset.created", "--from-beginning", "--json", "--no-follow"
    )

    shown = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["partition"], r["offset"]) for r in shown] == [
        (good.partition, good.offset),
        (bad.partition, bad.offset),
    ]
    decoded, invalid = shown
    assert decoded["key"] == "digits"
    assert decoded["event"]["id"] == UPSTREAM_EVENT["id"]
    assert decoded["event"]["type"] == "dataset.created"
    assert decoded["event"]["data"]["num_rows"] == 1797
    assert decoded["event"]["data"]["format"] == "parquet"  # a default filled in: decoded
    assert "not valid JSON" in invalid["invalid"] and invalid["raw"] == "rows=1797"


# -- kcat ---------------------------------------------------------------------------------------


@pytest.fixture
def kcat(tmp_path: Path) -> list[str]:
    """The `kcat` command, run against the librdkafka shipped in the confluent-kafka wheel:
    the distributions' kcat links an older librdkafka that cannot talk to the embedded
    broker (docs/broker.md)."""
    binary = shutil.which("kcat")
    if binary is None:
        pytest.fail("kcat is not installed (Debian/Ubuntu: apt-get install -y kcat)")
    wheel_libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(wheel_libs.glob("librdkafka*.so*"))
    if not found:
        pytest.fail(f"no librdkafka in {wheel_libs}: confluent-kafka was not installed as a wheel")
    libdir = tmp_path / "librdkafka"
    libdir.mkdir()
    (libdir / "librdkafka.so.1").symlink_to(found[0])
    env = os.environ | {"LD_LIBRARY_PATH": str(libdir)}
    version = subprocess.run(
        [binary, "-V"], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    wanted = f"librdkafka {confluent_kafka.libversion()[0]}"
    assert wanted in version, f"kcat does not run with the wheel's librdkafka:\n{version}"
    return ["env", f"LD_LIBRARY_PATH={libdir}", binary]


def test_kcat_produced_cloudevent_is_handled_as_a_typed_event(kafka, group, kcat):
    produced = subprocess.run(
        [*kcat, "-P", "-b", kafka.bootstrap, "-t", kafka.topic("dataset.created"), "-k", "digits"],
        input=json.dumps(UPSTREAM_EVENT) + "\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert produced.returncode == 0, produced.stderr

    handled = Recorder()
    stats = run_to_end(ConsumerLoop(kafka, group=group, handlers={"dataset.created": handled}))
    assert stats.deadlettered == 0, dead_letters(kafka)
    [event] = handled.events
    _assert_is_the_upstream_event(event)


def test_kcat_reads_what_mlbus_publishes_as_plain_json(kafka, kcat):
    payload = dataset(name="wine", num_rows=178)
    with EventProducer(kafka, source="mlbus/datasets") as producer:
        ref = producer.publish(payload)

    topic = kafka.topic("dataset.created")
    command = [*kcat, "-C", "-b", kafka.bootstrap, "-t", topic, "-o", "beginning", "-e", "-J", "-q"]
    read = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert read.returncode == 0, read.stderr
    [record] = [json.loads(line) for line in read.stdout.splitlines()]
    assert record["key"] == "wine"
    assert record["headers"] == ["content-type", "application/cloudevents+json"]
    event = json.loads(record["payload"])
    assert (event["id"], event["type"], event["source"]) == (
        ref.id,
        "dataset.created",
        "mlbus/datasets",
    )
    assert event["data"] == payload.model_dump(mode="json", exclude_none=True)
