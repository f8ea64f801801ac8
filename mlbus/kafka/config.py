"""librdkafka configuration for every client mlbus creates, in one place.

The delivery guarantees of docs/architecture.md are set here (idempotent producer, acks=all,
manual commits); the embedded broker gets the short timeouts docs/broker.md explains, and a
real cluster keeps Kafka's defaults.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from mlbus.kafka import lag
from mlbus.settings import Settings, is_secret, reveal

#: Python logger that receives librdkafka's own log lines (instead of raw stderr).
LIBRDKAFKA_LOGGER = "mlbus.librdkafka"
#: Largest record mlbus produces (a dead letter carrying a large original, base64).
MAX_RECORD_BYTES = 16 * 1024 * 1024


#: fetch.wait.max.ms of this process's consumers on the embedded broker (short: it looks for
#: new records only a few times during a wait, docs/broker.md). `mlbus run` sets its
#: service's (`Service.fetch_wait_ms`, mlbus/services.py); MLBUS_KAFKA__FETCH_WAIT_MAX_MS wins.
EMBEDDED_FETCH_WAIT_MS = [10]
#: fetch.wait.max.ms of a reader that reads to the end of its partitions and stops (a lookup:
#: `KafkaConfig.lookup`): an empty fetch is answered only when its wait is over, on any
#: broker, so the end of a partition is seen a wait after the last record. Such a reader is
#: idle only between reads, when it fetches nothing at all, so a short wait costs nothing then.
LOOKUP_FETCH_WAIT_MS = 10
#: fetch.wait.max.ms, at most, of consumers on an embedded broker that keeps a journal: idle,
#: they do not fetch at all (mlbus/kafka/quiet.py), so their wait only matters while records
#: flow and just after they pause (a fetch in flight then delays the next one).
QUIET_FETCH_WAIT_MS = 500


@dataclass(frozen=True)
class KafkaConfig:
    """Where the cluster is and how to talk to it. `extra` holds the user's librdkafka
    settings (MLBUS_KAFKA__*); secret ones are `SecretStr`, so no repr or log shows them."""

    bootstrap: str
    embedded: bool = False
    extra: Mapping[str, str | SecretStr] = field(default_factory=dict)
    topic_prefix: str = ""
    max_event_bytes: int = 1024 * 1024
    journal: str | None = None
    """the embedded broker's journal folder, when it keeps one (mlbus/journal/)"""
    stats_interval_ms: int = 0
    """how often group consumers report their lag to mlbus.kafka.lag (librdkafka
    statistics.interval.ms); 0: they do not"""
    gated: bool = False
    """the embedded broker sits behind `mlbus up`'s gate, which may put a new broker behind
    the same address (docs/broker.md, "Broker loss")"""

    def __post_init__(self) -> None:
        masked = {
            k: SecretStr(v) if isinstance(v, str) and is_secret(k) else v
            for k, v in self.extra.items()
        }
        object.__setattr__(self, "extra", masked)

    def options(self) -> dict[str, str]:
        """The user's librdkafka settings with their secrets, for a client's configuration."""
        return {k: reveal(v) for k, v in self.extra.items()}

    @classmethod
    def from_settings(cls, settings: Settings, *, bootstrap: str | None = None) -> KafkaConfig:
        """Connection for `settings`; with no cluster configured, the embedded broker at
        `bootstrap`, or else the one running in the data dir (`BrokerNotRunning` if none)."""
        from mlbus.broker import is_gated, resolve_bootstrap

        if bootstrap is not None and settings.embedded:
            embedded = True
        else:
            bootstrap, embedded = resolve_bootstrap(settings)
        return cls(
            bootstrap=bootstrap,
            embedded=embedded,
            extra=dict(settings.kafka),
            topic_prefix=settings.topic_prefix,
            max_event_bytes=settings.max_event_bytes,
            journal=(
                str(settings.data_dir / "journal")
                if embedded and settings.journal.enabled
                else None
            ),
            stats_interval_ms=settings.metrics.lag_interval_ms,
            gated=embedded and is_gated(settings.data_dir),
        )

    # -- topic naming: `type` equals the topic name, behind an optional prefix --------------

    def topic(self, event_type: str) -> str:
        return self.topic_prefix + event_type

    def event_type(self, topic: str) -> str:
        return topic[len(self.topic_prefix) :] if topic.startswith(self.topic_prefix) else topic

    # -- client configs --------------------------------------------------------------------

    def common(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": logging.getLogger(LIBRDKAFKA_LOGGER),
        }
        if self.embedded:
            # The embedded broker is restarted often; connection-close logs are noise there.
            conf["log.connection.close"] = False
            # `mlbus up` replaces a dead broker behind the same address (docs/broker.md,
            # "Broker loss"): clients retry within a second of it opening, not librdkafka's
            # default of up to 10 s.
            conf["reconnect.backoff.max.ms"] = 1000
            # It has no client-metrics push (KIP-714): without this every client asks for a
            # telemetry subscription every few seconds, for nothing.
            conf["enable.metrics.push"] = False
        conf.update(self.options())
        return conf

    def producer(self, **overrides: Any) -> dict[str, Any]:
        conf = self.common() | {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": MAX_RECORD_BYTES + 1024 * 1024,
        }
        if self.gated:
            # A broker put in place from the journal knows none of the old one's producer
            # ids: librdkafka fails an idempotent producer fatally when a retried batch meets
            # that, and a new producer could be handed an old id (and have records dropped as
            # duplicates). So no idempotence here; one request in flight keeps the order, and
            # a retry across a replacement may repeat a record, which consumers absorb (at
            # least once, effects idempotent by event id).
            conf |= {"enable.idempotence": False, "max.in.flight.requests.per.connection": 1}
        conf.update(overrides)
        return conf

    def consumer(self, group: str | None, **overrides: Any) -> dict[str, Any]:
        conf = self.common() | {
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            # Let a large record (up to MAX_RECORD_BYTES) through in one fetch.
            "max.partition.fetch.bytes": MAX_RECORD_BYTES + 1024 * 1024,
            "fetch.max.bytes": 4 * MAX_RECORD_BYTES,
        }
        if group is not None:
            conf["group.id"] = group
            if self.stats_interval_ms:
                # Consumer lag per partition for /metrics (mlbus/kafka/lag.py).
                conf["statistics.interval.ms"] = self.stats_interval_ms
                conf["stats_cb"] = functools.partial(lag.record, group, self.stats_interval_ms)
        else:  # group-less reader (tail, replay): never commits, joins nothing
            conf["group.id"] = "mlbus-reader-unused"
            conf["enable.auto.offset.store"] = False
        if self.embedded:
            # docs/broker.md: group join takes session.timeout/2, and a waiting fetch is not
            # answered early when data arrives.
            conf |= {
                "session.timeout.ms": 2000,
                "heartbeat.interval.ms": 500,
                "fetch.wait.max.ms": (
                    min(EMBEDDED_FETCH_WAIT_MS[0], QUIET_FETCH_WAIT_MS)
                    if self.journal is not None
                    else EMBEDDED_FETCH_WAIT_MS[0]
                ),
            }
        conf.update(self.options())  # what the user configured wins over mlbus's tuning
        conf.update(overrides)
        return conf

    def lookup(self, **overrides: Any) -> dict[str, Any]:
        """A group-less reader that reads to the end of its partitions and stops: its fetches
        wait only briefly (LOOKUP_FETCH_WAIT_MS) unless the user set a wait."""
        conf = self.consumer(None, **overrides)
        if "fetch.wait.max.ms" not in self.extra and "fetch.wait.max.ms" not in overrides:
            conf["fetch.wait.max.ms"] = LOOKUP_FETCH_WAIT_MS
        return conf

    def admin(self, **overrides: Any) -> dict[str, Any]:
        return self.common() | overrides
