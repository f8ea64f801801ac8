"""The exception tree of mlbus. Third-party errors (confluent-kafka, SQLAlchemy, s3fs) are
translated into these where they are called, so callers only ever handle these.

    MlbusError                    root: anything mlbus raises on purpose
    ├── ConfigError               a setting is wrong; the CLI prints one line and exits 2
    ├── TransientError            may succeed if retried (broker or store down): retry with backoff
    │   └── DeliveryError         the broker did not confirm a produced record
    ├── InvalidEvent              a record cannot be decoded or validated: dead-letter it
    ├── Abandon                   a handler stopped before finishing (shutdown): not committed
    ├── UnknownTopic              a name that is not in the topic catalog
    └── BrokerError               the embedded broker cannot be started or found
        └── BrokerNotRunning      no broker configured and none running in the data dir
"""

from __future__ import annotations


class MlbusError(Exception):
    """Root of every error mlbus raises on purpose."""


class ConfigError(MlbusError):
    """A setting is missing or wrong."""


class TransientError(MlbusError):
    """A failure that may go away if the operation is retried (with backoff)."""


class DeliveryError(TransientError):
    """The broker did not confirm delivery of one or more records."""


class InvalidEvent(MlbusError):
    """A record that cannot be decoded or validated; the consumer loop dead-letters it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Abandon(MlbusError):
    """Raised by a handler that stops before finishing its record because the loop is
    stopping (`record.stopping`): the record is neither committed nor dead-lettered, the loop
    stops, and the record is delivered again (to this group) later."""


class UnknownTopic(MlbusError):
    """A topic or event type that is not part of the contract."""


class BrokerError(MlbusError):
    """The embedded broker could not be started, reached or stopped."""


class BrokerNotRunning(BrokerError):
    """No Kafka cluster is configured and no embedded broker runs in the data dir."""
