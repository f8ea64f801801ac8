"""`mlbus archive restore`: a lost cluster rebuilt from the archive — same event ids, keys,
values, headers and timestamps, each key's events in their order — and safe to run again."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from mlbus.cli import app
from mlbus.consumers.archive.restore import TargetNotEmpty, record_identity, restore
from mlbus.consumers.archive.writer import Archiver
from mlbus.kafka.admin import apply_topics
from mlbus.kafka.config import KafkaConfig
from tests.conftest import unique
from tests.consumers.archive.support import TOPICS_USED, the_log
from tests.mlbus.test_cli import clean_env, json_lines, mlbus, ok


@pytest.fixture
def target(broker: KafkaConfig) -> KafkaConfig:
    """A second, empty deployment (another topic prefix) on the same broker: the new cluster."""
    config = replace(broker, topic_prefix=unique("r") + ".")
    apply_topics(config)
    return config


def archived(kafka, store) -> None:
    Archiver(kafka, store, group="archiver").run(stop_at_end=True, install_signal_handlers=False)


def per_key(kafka: KafkaConfig) -> dict[tuple[str, bytes | None], list[tuple]]:
    """Each (topic, key)'s records in log order: id, value, headers, timestamp."""
    out: dict[tuple[str, bytes | None], list[tuple]] = defaultdict(list)
    for r in the_log(kafka, TOPICS_USED):
        out[(r.topic, r.key)].append((record_identity(r), r.value, r.headers, r.timestamp_ms))
    return out


def assert_same_log(source: KafkaConfig, target: KafkaConfig) -> None:
    before, after = per_key(source), per_key(target)
    assert before.keys() == after.keys()
    for key, records in before.items():
        if key[1] is None:  # keyless records have no order to keep across partitions
            assert Counter(after[key]) == Counter(records)
        else:
            assert after[key] == records, key


def test_restore_into_a_new_cluster_keeps_ids_keys_values_and_order(log, local, target, tmp_path):
    archived(log, local)
    env = {
        "MLBUS_KAFKA_BOOTSTRAP_SERVERS": target.bootstrap,
        "MLBUS_TOPIC_PREFIX": target.topic_prefix,
        "MLBUS_OBJECT_STORE_URL": local.url,
        "MLBUS_DATA_DIR": str(tmp_path / "data"),
    }

    result = ok(mlbus("archive", "restore", *TOPICS_USED, "--json", env=clean_env(**env)))
    reports = {r["topic"]: r for r in json_lines(result.stdout)}
    source_log = the_log(log, TOPICS_USED)
    for name in TOPICS_USED:
        count = sum(1 for r in source_log if r.topic == name)
        assert reports[name] | {"topic": name} == {
            "topic": name,
            "archived": count,
            "published": count,
            "skipped": 0,
            "present": 0,
        }
    assert_same_log(log, target)
    assert any(record_identity(r) == "binary-mode-id" for r in the_log(target, TOPICS_USED))

    # Again: refused, because the topics are no longer empty (one line, exit 1) ...
    again = CliRunner().invoke(app, ["archive", "restore", *TOPICS_USED], env=env)
    assert again.exit_code == 1 and isinstance(again.exception, TargetNotEmpty)
    # ... and with --force, nothing is published twice.
    forced = CliRunner().invoke(
        app, ["archive", "restore", *TOPICS_USED, "--force", "--json"], env=env
    )
    assert forced.exit_code == 0, forced.output
    assert all(r["published"] == 0 for r in json_lines(forced.stdout))
    assert_same_log(log, target)


def test_an_interrupted_restore_is_finished_by_force(log, store, target):
    """Half a restore (here: one topic's first records) then a forced one: each event once."""
    archived(log, store)
    partial = [r for r in the_log(log, ["dataset.created"]) if r.partition == 0][:5]
    from confluent_kafka import Producer

    producer = Producer(target.producer())
    for r in partial:
        producer.produce(
            target.topic(r.topic), r.value, r.key, headers=list(r.headers), timestamp=r.timestamp_ms
        )
    assert producer.flush(30) == 0
    with pytest.raises(TargetNotEmpty, match=r"dataset\.created"):
        restore(target, store, TOPICS_USED)
    reports = {r.topic: r for r in restore(target, store, TOPICS_USED, force=True)}
    assert reports["dataset.created"].skipped == 5
    assert_same_log(log, target)
