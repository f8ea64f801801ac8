"""The OpenLineage emitter (`mlbus run openlineage`): a consumer group over dataset.created,
dataset.validated, training.started/completed/failed, model.promoted and deployment.updated
that sends each event's OpenLineage run events (events.py) through an `openlineage-python`
transport: HTTP to a Marquez-compatible `/api/v1/lineage`, a Kafka topic, or the console.
Writes no mlbus topic (dead letters aside).

Effects are idempotent by event id: an event always maps to the same run events (run ids
derived from mlbus's ids, times from the events), and a lineage server identifies a run
event by runId + eventType, so the redelivery of an uncommitted record after a crash, or a
replay of the whole log by a new group, resends identical events and changes nothing there.
An unreachable server or a 5xx is retried (TransientError) with the assignment paused; a 4xx
means the server refuses the event itself: it is dead-lettered.
"""

from __future__ import annotations

import logging
from typing import Any

import requests
from openlineage.client.event_v2 import RunEvent
from openlineage.client.serde import Serde
from openlineage.client.transport import Transport
from openlineage.client.transport.console import ConsoleConfig, ConsoleTransport
from openlineage.client.transport.http import HttpConfig, HttpTransport
from openlineage.client.transport.kafka import KafkaConfig as OLKafkaConfig
from openlineage.client.transport.kafka import KafkaTransport

from mlbus.consumers.openlineage.events import MAPPED, Lookups, Mapper
from mlbus.errors import ConfigError, InvalidEvent, TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.consumer import ConsumerLoop, LoopStats, Record
from mlbus.kafka.logview import LogIndex, dataset_versions
from mlbus.schemas.datasets import DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.settings import OpenLineageSettings

log = logging.getLogger(__name__)


NOT_CONFIGURED = (
    "openlineage: no transport configured; set MLBUS_OPENLINEAGE__URL (a Marquez-compatible "
    "server) or MLBUS_OPENLINEAGE__TRANSPORT=kafka|console"
)


def transport(cfg: OpenLineageSettings, kafka: KafkaConfig) -> Transport:
    """The client transport the settings name; ConfigError when they name none."""
    kind = cfg.kind
    if kind == "http":
        params: dict[str, Any] = {"url": cfg.url, "endpoint": cfg.endpoint, "timeout": cfg.timeout}
        if cfg.api_key is not None:
            params["auth"] = {"type": "api_key", "apiKey": cfg.api_key.get_secret_value()}
        # Retries are the consumer loop's (with backoff, nothing skipped), not the session's.
        params["retry"] = {"total": 0}
        return HttpTransport(HttpConfig.from_dict(params))
    if kind == "kafka":
        return ConfirmedKafkaTransport(
            OLKafkaConfig(config=kafka.producer(), topic=kafka.topic(cfg.topic), flush=True)
        )
    if kind == "console":
        return ConsoleTransport(ConsoleConfig())
    raise ConfigError(NOT_CONFIGURED)


class ConfirmedKafkaTransport(KafkaTransport):
    """The client's Kafka transport (same topic, same keys: a run's job, or its parent's, so
    a lineage chain stays in one partition), but a record that is not delivered raises
    TransientError instead of being logged and lost, so its event is retried."""

    def emit(self, event: Any) -> None:
        if self.producer is None:
            self._setup_producer(self.kafka_config.config)
        assert self.producer is not None
        failed: list[str] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                failed.append(str(error))

        self.producer.produce(
            topic=self.topic,
            key=self.message_key or self._get_message_key(event),
            value=Serde.to_json(event).encode("utf-8"),
            on_delivery=delivered,
        )
        left = self.producer.flush(timeout=30.0)
        if failed or left:
            raise TransientError(
                f"openlineage: not delivered to {self.topic}: {failed[0] if failed else 'timeout'}"
            )


class OpenLineageEmitter:
    """Maps the log to run events and emits them; `close()` when done (or use `with`)."""

    def __init__(
        self,
        kafka: KafkaConfig,
        cfg: OpenLineageSettings,
        *,
        group: str,
        sink: Transport | None = None,
    ) -> None:
        self.kafka = kafka
        self.group = group
        self._created = dataset_versions(kafka, name="openlineage datasets")
        self._validated: LogIndex[tuple[str, str]] = LogIndex(
            kafka, "dataset.validated", _dataset_key, name="openlineage validations"
        )
        self._requests: LogIndex[str] = LogIndex(
            kafka, "training.requested", lambda e: e.id, name="openlineage requests"
        )
        self.mapper = Mapper(
            cfg.namespace,
            cfg.producer,
            Lookups(
                created=lambda ref: self._created.get((ref.name, ref.version)),
                validated=lambda ref: self._validated.get((ref.name, ref.version)),
                request=self._requests.get,
            ),
        )
        # The transport itself, not `OpenLineageClient.emit`: the client adds facets from the
        # environment and from YAML files in the working and home directories, which would
        # make the events depend on where the service runs rather than on the log.
        self.transport = sink or transport(cfg, kafka)
        self.emitted = 0
        self.loop = ConsumerLoop(
            kafka,
            group=group,
            handlers=dict.fromkeys(MAPPED, self.handle),
            name="openlineage",
        )

    def handle(self, event: Event, record: Record) -> None:
        """Emit `event`'s run events, in order. Idempotent by event id (module docstring)."""
        for run_event in self.mapper.map(event, record.timestamp_ms):
            self.emit(run_event)

    def emit(self, run_event: RunEvent) -> None:
        try:
            self.transport.emit(run_event)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if 400 <= status < 500 and status not in (408, 429):
                state = getattr(run_event.eventType, "value", "")
                raise InvalidEvent(
                    f"openlineage: the server refused the {state} event of "
                    f"run {run_event.run.runId} ({status}): {Serde.to_json(run_event)[:500]}"
                ) from e
            raise TransientError(f"openlineage: the server answered {status}") from e
        except requests.RequestException as e:  # unreachable, timed out, 5xx past its retries
            raise TransientError(f"openlineage: server unavailable: {e}") from e
        self.emitted += 1

    def run(self, *, stop_at_end: bool = False, install_signal_handlers: bool = True) -> LoopStats:
        return self.loop.run(
            stop_at_end=stop_at_end, install_signal_handlers=install_signal_handlers
        )

    def stop(self) -> None:
        self.loop.stop()

    def close(self) -> None:
        for index in (self._created, self._validated, self._requests):
            index.close()
        self.transport.close(timeout=5.0)

    def __enter__(self) -> OpenLineageEmitter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dataset_key(event: Event) -> tuple[str, str]:
    data: DatasetValidated = event.data
    return data.name, data.version
