"""The Kafka connection of `mlbus streams`: every librdkafka setting the other services take
(MLBUS_KAFKA__*, in the kernel's KafkaConfig) translated into faust's settings for its
aiokafka client, or refused with an error naming the variable. So the stream processors join
the same (secured) cluster every other service joins, or say why they cannot; a setting is
never silently dropped. Reads and writes no topic.

librdkafka and aiokafka name things differently and have different units (ms against
seconds); where aiokafka has no counterpart of a setting that changes what the client does,
the setting is refused. A few settings tune only librdkafka's own diagnostics (its debug
contexts, log level, statistics): they are skipped here and logged once.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

from faust.auth import GSSAPICredentials, SASLCredentials, SSLCredentials

from mlbus.errors import ConfigError
from mlbus.kafka.config import KafkaConfig

log = logging.getLogger(__name__)

#: Security settings, used together to build faust's credentials (see `_credentials`).
SECURITY = frozenset(
    {
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "sasl.kerberos.service.name",
        "ssl.ca.location",
        "ssl.ca.pem",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.key.password",
        "ssl.endpoint.identification.algorithm",
        "enable.ssl.certificate.verification",
        "ssl.cipher.suites",
    }
)

#: librdkafka settings that tune only librdkafka's own diagnostics; aiokafka has none.
LIBRDKAFKA_ONLY = frozenset(
    {
        "debug",
        "log_level",
        "log.connection.close",
        "log.queue",
        "log.thread.name",
        "statistics.interval.ms",
    }
)

#: Why a setting the streams service cannot honour is refused (else: no counterpart).
REFUSED_BECAUSE = {
    "group.id": "the streams service's consumer group is its app id (`mlbus streams "
    "--app-id`, default <topic prefix>mlbus-streams); setting one group for every service "
    "would make them steal each other's partitions",
    "sasl.oauthbearer.method": "OAUTHBEARER needs a token provider, which the streams "
    "service's aiokafka client is not given",
    "sasl.kerberos.keytab": "aiokafka uses the process's Kerberos ticket cache (kinit "
    "before start); it takes no keytab",
    "sasl.kerberos.principal": "aiokafka uses the principal of the Kerberos ticket cache",
    "sasl.jaas.config": "a JAAS configuration is Java's; use sasl.username and sasl.password",
    "ssl.keystore.location": "Python's ssl module reads PEM files, not PKCS#12: use "
    "ssl.certificate.location and ssl.key.location",
    "ssl.certificate.pem": "aiokafka loads the client certificate from a file: use "
    "ssl.certificate.location",
    "ssl.key.pem": "aiokafka loads the client key from a file: use ssl.key.location",
}


IDEMPOTENCE_REFUSED = (
    "faust's aiokafka producer is idempotent only under exactly-once processing, which the "
    "streams service does not use (its writes are idempotent by event id instead); only "
    "`false` is accepted"
)


def env_name(key: str) -> str:
    return "MLBUS_KAFKA__" + key.upper().replace(".", "_")


def _ms(seconds_of: str) -> Callable[[str, str], dict[str, Any]]:
    def convert(key: str, value: str) -> dict[str, Any]:
        return {seconds_of: _int(key, value) / 1000}

    return convert


def _same(setting: str, cast: Callable[[str, str], Any]) -> Callable[[str, str], dict[str, Any]]:
    return lambda key, value: {setting: cast(key, value)}


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{env_name(key)}: {value!r} is not an integer") from None


def _bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ConfigError(f"{env_name(key)}: {value!r} is not true or false")


def _text(key: str, value: str) -> str:
    return value


def _acks(key: str, value: str) -> dict[str, Any]:
    acks = {"all": -1, "-1": -1, "0": 0, "1": 1}.get(value.strip().lower())
    if acks is None:
        raise ConfigError(f"{env_name(key)}: {value!r} is not all, -1, 0 or 1")
    return {"producer_acks": acks}


def _compression(key: str, value: str) -> dict[str, Any]:
    codec = value.strip().lower()
    if codec not in ("none", "gzip", "snappy", "lz4", "zstd"):
        raise ConfigError(f"{env_name(key)}: {value!r} is not none, gzip, snappy, lz4 or zstd")
    return {"producer_compression_type": None if codec == "none" else codec}


def _offset_reset(key: str, value: str) -> dict[str, Any]:
    where = value.strip().lower()
    if where in ("earliest", "smallest", "beginning"):
        return {"consumer_auto_offset_reset": "earliest"}
    if where in ("latest", "largest", "end"):
        return {"consumer_auto_offset_reset": "latest"}
    raise ConfigError(f"{env_name(key)}: {value!r} is not earliest or latest")


def _idempotence(key: str, value: str) -> dict[str, Any]:
    if _bool(key, value):
        raise ConfigError(f"{env_name(key)}=true is refused: {IDEMPOTENCE_REFUSED}")
    return {}


def _both(*settings: str) -> Callable[[str, str], dict[str, Any]]:
    return lambda key, value: dict.fromkeys(settings, _int(key, value))


#: librdkafka setting → faust settings (faust's names and units).
TRANSLATED: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "client.id": _same("broker_client_id", _text),
    "session.timeout.ms": _ms("broker_session_timeout"),
    "heartbeat.interval.ms": _ms("broker_heartbeat_interval"),
    "max.poll.interval.ms": _ms("broker_max_poll_interval"),
    "socket.timeout.ms": _ms("broker_request_timeout"),
    "request.timeout.ms": _ms("producer_request_timeout"),
    "linger.ms": _ms("producer_linger"),
    "queue.buffering.max.ms": _ms("producer_linger"),
    "group.instance.id": _same("consumer_group_instance_id", _text),
    "max.partition.fetch.bytes": _same("consumer_max_fetch_size", _int),
    "message.max.bytes": _same("producer_max_request_size", _int),
    "check.crcs": _same("broker_check_crcs", _bool),
    "metadata.max.age.ms": _both("consumer_metadata_max_age_ms", "producer_metadata_max_age_ms"),
    "connections.max.idle.ms": _both(
        "consumer_connections_max_idle_ms", "producer_connections_max_idle_ms"
    ),
    "acks": _acks,
    "request.required.acks": _acks,
    "compression.type": _compression,
    "compression.codec": _compression,
    "auto.offset.reset": _offset_reset,
    "enable.idempotence": _idempotence,
}


def faust_broker_settings(kafka: KafkaConfig) -> dict[str, Any]:
    """faust's connection settings for `kafka`: the brokers, every MLBUS_KAFKA__* setting
    translated (ConfigError naming the first that cannot be), and short group timeouts on
    the embedded broker unless set."""
    options = kafka.options()
    bootstrap = options.get("bootstrap.servers", kafka.bootstrap)
    out: dict[str, Any] = {"broker": ",".join(f"kafka://{s.strip()}" for s in bootstrap.split(","))}
    skipped = []
    for key, value in sorted(options.items()):
        if key in SECURITY or key == "bootstrap.servers":
            continue
        if key in LIBRDKAFKA_ONLY:
            skipped.append(key)
        elif key in TRANSLATED:
            out.update(TRANSLATED[key](key, value))
        elif key in REFUSED_BECAUSE:
            raise ConfigError(
                f"{env_name(key)} is refused by the streams service: {REFUSED_BECAUSE[key]}"
            )
        else:
            raise ConfigError(
                f"{env_name(key)} ({key}) has no counterpart in the streams service's Kafka "
                "client (faust on aiokafka), so it would be ignored there: unset it for "
                "`mlbus streams`, or ask for its translation"
            )
    if skipped:
        log.info("streams: librdkafka-only settings not used by aiokafka: %s", ", ".join(skipped))
    if kafka.embedded:  # docs/broker.md: a group join takes session.timeout / 2
        out.setdefault("broker_session_timeout", 2.0)
        out.setdefault("broker_heartbeat_interval", 0.5)
    if "broker_session_timeout" in out:
        out.setdefault("broker_rebalance_timeout", max(out["broker_session_timeout"], 2.0))
    credentials = _credentials(options)
    if credentials is not None:
        out["broker_credentials"] = credentials
    return out


def _credentials(options: dict[str, str]) -> Any:
    """faust's credentials for librdkafka's security settings (None: plaintext)."""
    protocol = options.get("security.protocol", "plaintext").strip().upper()
    mechanism = (options.get("sasl.mechanism") or options.get("sasl.mechanisms") or "").upper()
    if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError(
            f"{env_name('security.protocol')}: {protocol!r} is not PLAINTEXT, SSL, "
            "SASL_PLAINTEXT or SASL_SSL"
        )
    ssl_keys = {k for k in options if k.startswith("ssl.") or k.startswith("enable.ssl.")}
    if protocol in ("PLAINTEXT", "SASL_PLAINTEXT") and ssl_keys:
        raise ConfigError(
            f"{env_name(sorted(ssl_keys)[0])} is set but security.protocol is {protocol}: "
            "set MLBUS_KAFKA__SECURITY_PROTOCOL to SSL or SASL_SSL"
        )
    context = _ssl_context(options) if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return SSLCredentials(context)
    mechanism = mechanism or "GSSAPI"  # librdkafka's default mechanism
    if mechanism == "GSSAPI":
        return GSSAPICredentials(
            kerberos_service_name=options.get("sasl.kerberos.service.name", "kafka"),
            kerberos_domain_name=None,
            ssl_context=context,
        )
    if mechanism == "OAUTHBEARER":
        raise ConfigError(
            f"{env_name('sasl.mechanism')}=OAUTHBEARER is refused by the streams service: "
            f"{REFUSED_BECAUSE['sasl.oauthbearer.method']}"
        )
    if mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        raise ConfigError(
            f"{env_name('sasl.mechanism')}: {mechanism!r} is not PLAIN, SCRAM-SHA-256, "
            "SCRAM-SHA-512, GSSAPI or OAUTHBEARER"
        )
    missing = [k for k in ("sasl.username", "sasl.password") if not options.get(k)]
    if missing:
        raise ConfigError(f"SASL {mechanism} needs {env_name(missing[0])}")
    return SASLCredentials(
        username=options["sasl.username"],
        password=options["sasl.password"],
        ssl_context=context,
        mechanism=mechanism,
    )


def _ssl_context(options: dict[str, str]) -> ssl.SSLContext:
    """An SSL context as librdkafka's ssl.* settings describe it."""
    ca = options.get("ssl.ca.location")
    try:
        context = ssl.create_default_context(
            cafile=ca if ca and not os.path.isdir(ca) else None,
            capath=ca if ca and os.path.isdir(ca) else None,
            cadata=options.get("ssl.ca.pem"),
        )
        certificate = options.get("ssl.certificate.location")
        key = options.get("ssl.key.location")
        if bool(certificate) != bool(key):
            which = "ssl.key.location" if certificate else "ssl.certificate.location"
            raise ConfigError(f"a client certificate needs {env_name(which)} too")
        if certificate:
            context.load_cert_chain(certificate, key, options.get("ssl.key.password"))
        if "ssl.cipher.suites" in options:
            context.set_ciphers(options["ssl.cipher.suites"])
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"the streams service cannot build its TLS context: {e}") from None
    identification = options.get("ssl.endpoint.identification.algorithm", "https").lower()
    if identification not in ("https", "none"):
        raise ConfigError(
            f"{env_name('ssl.endpoint.identification.algorithm')}: {identification!r} is "
            "not https or none"
        )
    if identification == "none":
        context.check_hostname = False
    if "enable.ssl.certificate.verification" in options and not _bool(
        "enable.ssl.certificate.verification", options["enable.ssl.certificate.verification"]
    ):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
