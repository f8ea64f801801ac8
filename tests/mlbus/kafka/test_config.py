"""librdkafka settings: guarantees always on, embedded-broker tuning only when embedded."""

from __future__ import annotations

from mlbus.kafka.config import KafkaConfig
from mlbus.settings import Settings


def test_producer_guarantees_hold_everywhere():
    for embedded in (True, False):
        conf = KafkaConfig(bootstrap="h:9092", embedded=embedded).producer()
        assert conf["enable.idempotence"] is True
        assert conf["acks"] == "all"


def test_behind_the_gate_producers_keep_order_without_producer_ids():
    """A broker replaced behind `mlbus up`'s gate knows no old producer id (docs/broker.md,
    "Broker loss"): no idempotence there, one request in flight, acks=all."""
    conf = KafkaConfig(bootstrap="h:9092", embedded=True, gated=True).producer()
    assert conf["enable.idempotence"] is False
    assert conf["max.in.flight.requests.per.connection"] == 1
    assert conf["acks"] == "all"
    assert (
        KafkaConfig(bootstrap="h:9092", embedded=True).common()["reconnect.backoff.max.ms"] == 1000
    )


def test_consumer_commits_manually_and_tunes_only_the_embedded_broker():
    real = KafkaConfig(bootstrap="h:9092").consumer("g")
    embedded = KafkaConfig(bootstrap="h:9092", embedded=True).consumer("g")
    assert real["enable.auto.commit"] is False and embedded["enable.auto.commit"] is False
    assert "session.timeout.ms" not in real and "fetch.wait.max.ms" not in real
    assert embedded["session.timeout.ms"] == 2000 and embedded["fetch.wait.max.ms"] == 10


def test_extra_librdkafka_settings_pass_through_and_win():
    kafka = KafkaConfig(
        bootstrap="h:9092", extra={"security.protocol": "SASL_SSL", "linger.ms": "50"}
    )
    assert kafka.producer()["linger.ms"] == 5  # mlbus's own choice is applied after common()
    assert kafka.consumer("g")["security.protocol"] == "SASL_SSL"
    assert kafka.admin()["security.protocol"] == "SASL_SSL"


def test_topic_prefix_maps_types_to_topics_and_back():
    kafka = KafkaConfig(bootstrap="h:9092", topic_prefix="staging.")
    assert kafka.topic("model.promoted") == "staging.model.promoted"
    assert kafka.event_type("staging.model.promoted") == "model.promoted"


def test_from_settings_with_an_external_cluster(tmp_path):
    settings = Settings(
        data_dir=tmp_path, kafka_bootstrap_servers="a:9092,b:9092", kafka={"client_id": "x"}
    )
    kafka = KafkaConfig.from_settings(settings)
    assert (kafka.bootstrap, kafka.embedded) == ("a:9092,b:9092", False)
    assert kafka.common()["client.id"] == "x"
