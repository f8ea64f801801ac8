"""The dataset validator in a real consumer loop on the real broker: announcements from the
registry and from upstream systems (plain JSON CloudEvents produced with a plain Kafka
client) are checked against the bytes they point at; a good one becomes `dataset.validated`,
a bad one a dead letter naming the field that does not match — and nothing downstream."""

from __future__ import annotations

import io
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlbus.datasets.registry import DatasetRegistry
from mlbus.datasets.sources import from_table
from mlbus.datasets.stats import StatsBuilder
from mlbus.datasets.validator import CHECKS, Validator, check, validated_id
from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import Backoff, ConsumerLoop
from mlbus.kafka.deadletter import original_value
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import STRUCTURED_HEADERS
from mlbus.schemas.datasets import DatasetCreated
from mlbus.settings import LimitsSettings
from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import (
    LoopThread,
    dead_letters,
    produce_raw,
    read_events,
    run_to_end,
    wait_until,
)
from tests.mlbus.storage_support import STORE_KINDS, make_store, s3_options, sha256_hex


def table(rows: int = 50) -> pa.Table:
    return pa.table({"x": pa.array([i / 2 for i in range(rows)]), "label": list(range(rows))})


def parquet_bytes(data: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(data, sink)
    return sink.getvalue()


def upstream_event(uri: str, raw: bytes, data: pa.Table, **changes: Any) -> dict[str, Any]:
    """What an ETL job publishes about the Parquet it wrote, by hand (no mlbus code)."""
    payload = {
        "name": "lake-orders",
        "version": "2026-11-21",
        "uri": uri,
        "content_hash": sha256_hex(raw),
        "arrow_schema": [{"name": f.name, "type": str(f.type)} for f in data.schema],
        "num_rows": data.num_rows,
        "num_bytes": len(raw),
        "label_column": "label",
    }
    payload.update(changes)
    return {
        "specversion": "1.0",
        "id": f"etl-{uuid.uuid4()}",
        "source": "etl/nightly",
        "type": "dataset.created",
        "time": "2026-11-21T12:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": "nightly-run-7",
        "data": payload,
    }


def publish_upstream(kafka: KafkaConfig, event: dict[str, Any]) -> None:
    produce_raw(
        kafka,
        kafka.topic("dataset.created"),
        json.dumps(event),
        key=event["data"]["name"],
        headers=STRUCTURED_HEADERS,
    )


def run_validator(
    kafka: KafkaConfig, store: ObjectStore, group: str, limits: LimitsSettings | None = None
) -> None:
    """Validate everything on dataset.created, up to the end of the topic."""
    with EventProducer(kafka, source="mlbus/datasets") as producer:
        validator = Validator(store, producer, limits=limits)
        loop = ConsumerLoop(
            kafka,
            group=group,
            name="datasets-validator",
            handlers={"dataset.created": validator},
        )
        try:
            run_to_end(loop)
        finally:
            validator.close()


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    store = make_store(request.param, request, tmp_path)
    lake = tmp_path / "lake"
    lake.mkdir()
    store.allowed_roots = [str(lake)]
    return store


def test_a_registered_dataset_is_validated_once_by_id(
    store: ObjectStore, kafka: KafkaConfig, group: str
) -> None:
    with DatasetRegistry(store, kafka) as registry:
        registered = registry.register(from_table(table()), name="digits")
    (created,) = read_events(kafka, "dataset.created")

    run_validator(kafka, store, group)

    assert dead_letters(kafka) == []
    (validated,) = read_events(kafka, "dataset.validated")
    assert validated.id == validated_id(created.id)
    assert validated.causationid == created.id
    assert validated.correlationid == created.correlationid
    assert validated.subject == created.subject
    d = validated.data
    assert (d.name, d.version, d.uri, d.content_hash, d.num_rows) == (
        "digits",
        registered.version,
        registered.uri,
        registered.content_hash,
        50,
    )
    assert d.validator == "validator" and d.checks == CHECKS
    # The registry computed the statistics: the validated event carries them as they were.
    assert d.columns == created.data.columns and set(d.columns) == {"x", "label"}
    assert not d.stats_computed

    # Exactly-once effect by id: the same dataset.created processed again (here by another
    # group, as after a crash before the commit) publishes the very same event id.
    run_validator(kafka, store, group + "-again")
    first, second = read_events(kafka, "dataset.validated")
    assert first.id == second.id and first.data == second.data


BAD_CASES = {
    # case: (what is wrong, the field the dead letter must name)
    "hash-mismatch": "content_hash",
    "schema-differs": "arrow_schema",
    "type-differs": "arrow_schema",
    "wrong-num-rows": "num_rows",
    "missing-file": "uri",
    "outside-roots": "uri",
    "escapes-root": "uri",
    "not-parquet": "uri",
}


def test_upstream_announcements_are_checked_against_their_bytes(
    tmp_path: Path, kafka: KafkaConfig, group: str
) -> None:
    store = ObjectStore((tmp_path / "store").as_uri())
    lake = tmp_path / "lake"
    lake.mkdir()
    store.allowed_roots = [str(lake)]
    data = table()
    raw = parquet_bytes(data)
    good_path = lake / "orders.parquet"
    good_path.write_bytes(raw)
    (lake / "notes.parquet").write_text("order_id,amount\n1,2\n")
    (tmp_path / "outside.parquet").write_bytes(raw)
    uri = good_path.as_uri()

    events = {
        "hash-mismatch": upstream_event(uri, raw, data, content_hash=sha256_hex(b"other")),
        "schema-differs": upstream_event(
            uri, raw, data, arrow_schema=[{"name": "x", "type": "double"}]
        ),
        "type-differs": upstream_event(
            uri,
            raw,
            data,
            arrow_schema=[{"name": "x", "type": "float"}, {"name": "label", "type": "int64"}],
        ),
        "wrong-num-rows": upstream_event(uri, raw, data, num_rows=49),
        "missing-file": upstream_event((lake / "gone.parquet").as_uri(), raw, data),
        "outside-roots": upstream_event((tmp_path / "outside.parquet").as_uri(), raw, data),
        "escapes-root": upstream_event(f"file://{lake}/../outside.parquet", raw, data),
        "not-parquet": upstream_event((lake / "notes.parquet").as_uri(), raw, data),
    }
    good = upstream_event(uri, raw, data)
    # One key, so one partition: the good announcement comes after every bad one.
    for event in events.values():
        publish_upstream(kafka, event)
    publish_upstream(kafka, good)

    run_validator(kafka, store, group)

    letters = {json.loads(original_value(e.data))["id"]: e.data for e in dead_letters(kafka)}
    by_case = {case: letters.get(event["id"]) for case, event in events.items()}
    missing = [case for case, letter in by_case.items() if letter is None]
    assert not missing, f"not dead-lettered: {missing}; letters: {letters}"
    for case, letter in by_case.items():
        assert letter is not None
        assert letter.reason.startswith(BAD_CASES[case] + ":"), (case, letter.reason)
        assert letter.error_type == "InvalidEvent"
        assert letter.consumer_group == group
        assert letter.original.topic == kafka.topic("dataset.created")
    assert len(letters) == len(events), "the good announcement was dead-lettered"

    # Nothing downstream for the bad ones; the good one, after them, validated.
    (validated,) = read_events(kafka, "dataset.validated")
    assert validated.causationid == good["id"]
    assert validated.id == validated_id(good["id"])
    assert validated.correlationid == "nightly-run-7"
    assert validated.data.content_hash == good["data"]["content_hash"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_object_store_outage_is_retried_not_dead_lettered(
    s3: dict[str, str], kafka: KafkaConfig, group: str
) -> None:
    """docs/architecture.md: a store that is down is a transient failure, retried with backoff; the
    announcement is not dead-lettered for it (it is probably fine)."""
    down = ObjectStore(
        "s3://lake/exports",
        s3_endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        storage_options=s3_options(s3, config_kwargs={"retries": {"max_attempts": 1}}),
    )
    data = table()
    raw = parquet_bytes(data)
    event = upstream_event(down.uri("day1/orders.parquet"), raw, data)

    with pytest.raises(TransientError):
        check(down, DatasetCreated.model_validate(event["data"]))

    publish_upstream(kafka, event)
    with EventProducer(kafka, source="mlbus/datasets") as producer:
        loop = ConsumerLoop(
            kafka,
            group=group,
            handlers={"dataset.created": Validator(down, producer)},
            backoff=Backoff(initial=0.05, maximum=0.2),
        )
        with LoopThread(loop):
            wait_until(
                lambda: loop.stats.retries >= 2 or loop.stats.deadlettered,
                "the validator to retry or dead-letter",
            )
    assert dead_letters(kafka) == [], "an outage of the object store dead-lettered the event"
    assert read_events(kafka, "dataset.validated") == []


# -- what a version is ---------------------------------------------------------------------


@pytest.fixture
def lake(tmp_path: Path) -> tuple[ObjectStore, Path]:
    store = ObjectStore((tmp_path / "store").as_uri())
    folder = tmp_path / "lake"
    folder.mkdir()
    store.allowed_roots = [str(folder)]
    return store, folder


def letters_by_id(kafka: KafkaConfig) -> dict[str, Any]:
    return {json.loads(original_value(e.data))["id"]: e.data for e in dead_letters(kafka)}


def test_a_version_that_is_not_a_version_token_is_refused(
    lake: tuple[ObjectStore, Path], kafka: KafkaConfig, group: str
) -> None:
    store, folder = lake
    data = table()
    raw = parquet_bytes(data)
    path = folder / "orders.parquet"
    path.write_bytes(raw)
    other_hex = "ab" * 32  # 64 hex digits that are not the content hash's
    bad = {
        version: upstream_event(path.as_uri(), raw, data, version=version)
        for version in ("nightly run 7", "../2026", "v1@x", "x" * 129, "-v1", other_hex)
    }
    content_id = upstream_event(
        path.as_uri(), raw, data, version=sha256_hex(raw).removeprefix("sha256:")
    )
    for event in [*bad.values(), content_id]:
        publish_upstream(kafka, event)

    run_validator(kafka, store, group)

    letters = letters_by_id(kafka)
    for version, event in bad.items():
        letter = letters.get(event["id"])
        assert letter is not None, f"version {version!r} was not refused"
        assert letter.reason.startswith("version:"), letter.reason
    assert "content id" in letters[bad[other_hex]["id"]].reason
    (validated,) = read_events(kafka, "dataset.validated")
    assert validated.causationid == content_id["id"]


def test_a_version_announced_again_with_other_content_is_refused(
    lake: tuple[ObjectStore, Path], kafka: KafkaConfig, group: str
) -> None:
    store, folder = lake
    first_data, second_data = table(50), table(60)
    first_raw, second_raw = parquet_bytes(first_data), parquet_bytes(second_data)
    (folder / "a.parquet").write_bytes(first_raw)
    (folder / "b.parquet").write_bytes(second_raw)
    first = upstream_event((folder / "a.parquet").as_uri(), first_raw, first_data)
    # The same name@version ("2026-11-21"), other bytes that match their own event.
    other = upstream_event((folder / "b.parquet").as_uri(), second_raw, second_data)
    # The same content announced once more (another id): nothing contradicts it.
    repeated = upstream_event((folder / "a.parquet").as_uri(), first_raw, first_data)
    for event in (first, other, repeated):
        publish_upstream(kafka, event)

    run_validator(kafka, store, group)

    letters = letters_by_id(kafka)
    assert set(letters) == {other["id"]}
    reason = letters[other["id"]].reason
    assert reason.startswith("version: lake-orders@2026-11-21 was validated with content hash")
    assert sha256_hex(first_raw) in reason and "new version" in reason
    validated = read_events(kafka, "dataset.validated")
    assert [e.causationid for e in validated] == [first["id"], repeated["id"]]

    # A new validator (its view of dataset.validated read afresh) knows the version too.
    later = upstream_event((folder / "b.parquet").as_uri(), second_raw, second_data)
    publish_upstream(kafka, later)
    run_validator(kafka, store, group)
    assert later["id"] in letters_by_id(kafka)


# -- statistics for datasets announced without them ----------------------------------------


def test_an_upstream_dataset_without_statistics_gets_them_in_dataset_validated(
    lake: tuple[ObjectStore, Path], kafka: KafkaConfig, group: str
) -> None:
    store, folder = lake
    data = pa.table(
        {
            "x": pa.array([i / 4 for i in range(3000)]),
            "kind": pa.array(["a", "b", "b"] * 1000),
            "label": pa.array([i % 3 for i in range(3000)]),
        }
    )
    sink = io.BytesIO()
    pq.write_table(data, sink, row_group_size=1000)  # several row groups
    raw = sink.getvalue()
    (folder / "orders.parquet").write_bytes(raw)
    event = upstream_event((folder / "orders.parquet").as_uri(), raw, data)
    assert "columns" not in event["data"]
    publish_upstream(kafka, event)

    run_validator(kafka, store, group)

    assert dead_letters(kafka) == []
    (validated,) = read_events(kafka, "dataset.validated")
    expected = StatsBuilder(data.schema)
    for batch in data.to_batches():
        expected.add(batch)
    assert validated.data.stats_computed
    assert validated.data.columns == expected.result()
    x = validated.data.columns["x"]
    assert (x.min, x.max, x.histogram is not None) == (0.0, 2999 / 4, True)
    assert validated.data.columns["kind"].distinct_count == 2


def test_computing_statistics_still_checks_the_hash(
    lake: tuple[ObjectStore, Path], kafka: KafkaConfig, group: str
) -> None:
    store, folder = lake
    data = table()
    raw = parquet_bytes(data)
    (folder / "orders.parquet").write_bytes(raw)
    event = upstream_event(
        (folder / "orders.parquet").as_uri(), raw, data, content_hash=sha256_hex(b"other")
    )
    publish_upstream(kafka, event)

    run_validator(kafka, store, group)

    (letter,) = dead_letters(kafka)
    assert letter.data.reason.startswith("content_hash:")
    assert read_events(kafka, "dataset.validated") == []


def test_a_row_group_over_the_limit_is_refused_unread(
    lake: tuple[ObjectStore, Path], kafka: KafkaConfig, group: str
) -> None:
    store, folder = lake
    data = table(5000)
    raw = parquet_bytes(data)
    (folder / "orders.parquet").write_bytes(raw)
    publish_upstream(kafka, upstream_event((folder / "orders.parquet").as_uri(), raw, data))

    run_validator(kafka, store, group, limits=LimitsSettings(max_row_group_bytes=4096))

    (letter,) = dead_letters(kafka)
    reason = letter.data.reason
    assert reason.startswith("uri:") and "row group 0" in reason, reason
    assert "MLBUS_LIMITS__MAX_ROW_GROUP_BYTES" in reason
    assert read_events(kafka, "dataset.validated") == []
