"""The Kafka connection of `mlbus streams` (streams/connection.py): every MLBUS_KAFKA__*
setting the other services take is translated for faust/aiokafka or refused with an error
naming the variable; secrets never show; the changelog is replicated by the catalog's rule."""

from __future__ import annotations

import logging
import ssl

import certifi
import faust
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from faust.auth import GSSAPICredentials, SASLCredentials, SSLCredentials

from mlbus.errors import ConfigError
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.catalog import TOPICS
from mlbus.streams.app import changelog_topic, ensure_changelog
from mlbus.streams.connection import (
    LIBRDKAFKA_ONLY,
    REFUSED_BECAUSE,
    SECURITY,
    TRANSLATED,
    faust_broker_settings,
)
from tests.conftest import unique


def settings_for(**extra: str) -> dict:
    return faust_broker_settings(KafkaConfig(bootstrap="k1:9092,k2:9092", extra=extra))


#: One value per translated setting, and what faust must then hold (its names, its units).
TRANSLATIONS = {
    "client.id": ("streams-1", {"broker_client_id": "streams-1"}),
    "session.timeout.ms": ("45000", {"broker_session_timeout": 45.0}),
    "heartbeat.interval.ms": ("3000", {"broker_heartbeat_interval": 3.0}),
    "max.poll.interval.ms": ("300000", {"broker_max_poll_interval": 300.0}),
    "socket.timeout.ms": ("60000", {"broker_request_timeout": 60.0}),
    "request.timeout.ms": ("30000", {"producer_request_timeout": 30.0}),
    "linger.ms": ("5", {"producer_linger": 0.005}),
    "queue.buffering.max.ms": ("20", {"producer_linger": 0.02}),
    "group.instance.id": ("streams-a", {"consumer_group_instance_id": "streams-a"}),
    "max.partition.fetch.bytes": ("2097152", {"consumer_max_fetch_size": 2097152}),
    "message.max.bytes": ("2000000", {"producer_max_request_size": 2000000}),
    "check.crcs": ("false", {"broker_check_crcs": False}),
    "metadata.max.age.ms": (
        "60000",
        {"consumer_metadata_max_age_ms": 60000, "producer_metadata_max_age_ms": 60000},
    ),
    "connections.max.idle.ms": (
        "100000",
        {"consumer_connections_max_idle_ms": 100000, "producer_connections_max_idle_ms": 100000},
    ),
    "acks": ("all", {"producer_acks": -1}),
    "request.required.acks": ("1", {"producer_acks": 1}),
    "compression.type": ("zstd", {"producer_compression_type": "zstd"}),
    "compression.codec": ("none", {"producer_compression_type": None}),
    "auto.offset.reset": ("smallest", {"consumer_auto_offset_reset": "earliest"}),
    "enable.idempotence": ("false", {}),
}

#: librdkafka settings a deployment may well set for the other services, which aiokafka
#: has no counterpart of: each must be refused, never dropped.
NO_COUNTERPART = [
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "partition.assignment.strategy",
    "isolation.level",
    "group.protocol",
    "socket.keepalive.enable",
    "socket.send.buffer.bytes",
    "reconnect.backoff.ms",
    "retry.backoff.ms",
    "batch.num.messages",
    "batch.size",
    "queue.buffering.max.messages",
    "message.timeout.ms",
    "transactional.id",
    "broker.address.family",
    "api.version.request",
    "topic.metadata.refresh.interval.ms",
    "enable.partition.eof",
    "ssl.crl.location",
    "sasl.oauthbearer.client.id",
    "sasl.kerberos.kinit.cmd",
    "client.rack",
    "typo.in.a.setting",
]


def test_the_categories_do_not_overlap():
    groups = [set(TRANSLATED), set(SECURITY), set(LIBRDKAFKA_ONLY), set(REFUSED_BECAUSE)]
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            assert not a & b
    assert set(TRANSLATIONS) == set(TRANSLATED), "every translation is tested"


@pytest.mark.parametrize("key", sorted(TRANSLATIONS))
def test_every_translated_setting_reaches_faust_in_its_units(key):
    value, expected = TRANSLATIONS[key]
    out = settings_for(**{key: value})
    for name, wanted in expected.items():
        assert out[name] == wanted
    # The names are faust's own (faust accepts unknown keyword arguments silently).
    app = faust.App(unique("conf-"), **out)
    for name, wanted in expected.items():
        assert getattr(app.conf, name) == wanted, name


@pytest.mark.parametrize("key", [*NO_COUNTERPART, *sorted(REFUSED_BECAUSE), "enable.idempotence"])
def test_every_other_setting_is_refused_naming_its_variable(key):
    value = "secret-value-1" if "jaas" in key or key.endswith("pem") else "1"
    if key == "enable.idempotence":
        value = "true"
    with pytest.raises(ConfigError) as refused:
        settings_for(**{key: value})
    env = "MLBUS_KAFKA__" + key.upper().replace(".", "_")
    assert env in str(refused.value)
    assert "secret-value-1" not in str(refused.value)


def test_librdkafka_diagnostics_are_skipped_and_said(caplog):
    with caplog.at_level(logging.INFO, logger="mlbus.streams.connection"):
        out = settings_for(**dict.fromkeys(LIBRDKAFKA_ONLY, "1"))
    assert out == {"broker": "kafka://k1:9092,kafka://k2:9092"}
    for key in LIBRDKAFKA_ONLY:
        assert key in caplog.text


def test_sasl_over_tls_becomes_faust_credentials_and_the_password_never_shows():
    out = settings_for(
        **{
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "streams",
            "sasl.password": "kafka-pass-1",
            "ssl.ca.location": certifi.where(),
        }
    )
    credentials = out["broker_credentials"]
    assert isinstance(credentials, SASLCredentials)
    assert credentials.protocol.value == "SASL_SSL"
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert (credentials.username, credentials.password) == ("streams", "kafka-pass-1")
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert "kafka-pass-1" not in repr(out) and "kafka-pass-1" not in str(out)
    app = faust.App(unique("conf-"), **out)
    assert app.conf.broker_credentials is credentials


def test_plain_sasl_without_tls_and_tls_alone():
    plain = settings_for(
        **{
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": "PLAIN",
            "sasl.username": "u",
            "sasl.password": "p",
        }
    )["broker_credentials"]
    assert isinstance(plain, SASLCredentials) and plain.protocol.value == "SASL_PLAINTEXT"
    tls = settings_for(
        **{"security.protocol": "SSL", "ssl.endpoint.identification.algorithm": "none"}
    )["broker_credentials"]
    assert isinstance(tls, SSLCredentials) and tls.context.check_hostname is False
    unverified = settings_for(
        **{"security.protocol": "ssl", "enable.ssl.certificate.verification": "false"}
    )["broker_credentials"]
    assert unverified.context.verify_mode == ssl.CERT_NONE
    kerberos = settings_for(
        **{"security.protocol": "SASL_PLAINTEXT", "sasl.kerberos.service.name": "kafka-x"}
    )["broker_credentials"]
    assert isinstance(kerberos, GSSAPICredentials)
    assert kerberos.kerberos_service_name == "kafka-x"
    assert "broker_credentials" not in settings_for(**{"security.protocol": "PLAINTEXT"})


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}, "SASL_MECHANISM"),
        ({"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}, "SASL_USERNAME"),
        ({"security.protocol": "PLAINTEXT", "ssl.ca.location": "/x"}, "SSL_CA_LOCATION"),
        ({"security.protocol": "SSL", "ssl.ca.location": "/nonexistent.pem"}, "TLS context"),
        ({"security.protocol": "SSL", "ssl.certificate.location": "/c.pem"}, "SSL_KEY_LOCATION"),
        ({"security.protocol": "TLS"}, "SECURITY_PROTOCOL"),
        ({"session.timeout.ms": "soon"}, "SESSION_TIMEOUT_MS"),
    ],
)
def test_security_settings_that_cannot_work_are_refused(extra, named):
    with pytest.raises(ConfigError, match=named):
        settings_for(**extra)


def test_the_embedded_broker_keeps_its_short_group_timeouts_unless_set():
    embedded = KafkaConfig(bootstrap="127.0.0.1:1", embedded=True)
    out = faust_broker_settings(embedded)
    assert (out["broker_session_timeout"], out["broker_heartbeat_interval"]) == (2.0, 0.5)
    mine = KafkaConfig(bootstrap="127.0.0.1:1", embedded=True, extra={"session.timeout.ms": "6000"})
    assert faust_broker_settings(mine)["broker_session_timeout"] == 6.0
    assert settings_for() == {"broker": "kafka://k1:9092,kafka://k2:9092"}


def test_the_changelog_is_replicated_by_the_catalogs_rule(kafka):
    app_id = unique("streams-")
    brokers = len(AdminClient(kafka.admin()).list_topics(timeout=10).brokers)
    replication = ensure_changelog(kafka, app_id)
    assert replication == TOPICS["inference.logged"].replication_on(brokers)
    name = changelog_topic(app_id)
    admin = AdminClient(kafka.admin())
    topic = admin.list_topics(name, timeout=10).topics[name]
    assert len(topic.partitions) == TOPICS["inference.logged"].partitions
    assert len(topic.partitions[0].replicas) == replication
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    wanted = TOPICS["inference.logged"].configs(replication)["min.insync.replicas"]
    assert configs["min.insync.replicas"].value == wanted
    assert configs["cleanup.policy"].value == "compact"
    assert ensure_changelog(kafka, app_id) == replication  # idempotent


def test_from_the_environment_as_every_service_reads_it(monkeypatch):
    from mlbus.settings import load_settings

    monkeypatch.setenv("MLBUS_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_USERNAME", "streams")
    monkeypatch.setenv("MLBUS_KAFKA__SASL_PASSWORD", "kafka-pass-2")
    monkeypatch.setenv("MLBUS_KAFKA__SESSION_TIMEOUT_MS", "30000")
    kafka = KafkaConfig.from_settings(load_settings(), bootstrap="h:9092")
    out = faust_broker_settings(kafka)
    assert out["broker_credentials"].password == "kafka-pass-2"
    assert out["broker_session_timeout"] == 30.0
    assert "kafka-pass-2" not in repr(out) + repr(kafka)
    monkeypatch.setenv("MLBUS_KAFKA__FETCH_WAIT_MAX_MS", "10")
    with pytest.raises(ConfigError, match="MLBUS_KAFKA__FETCH_WAIT_MAX_MS"):
        faust_broker_settings(KafkaConfig.from_settings(load_settings(), bootstrap="h:9092"))
