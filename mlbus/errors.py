"""The exception tree of mlbus. Third-party errors (confluent-kafka, SQLAlchemy, s3fs) are
translated into these where they are called, so callers only ever handle these.

The root and the semantic bases (not found, invalid, conflict, unauthorized, transient) live
in the contract (mlbus/schemas/errors.py), which imports nothing of mlbus; this module
re-exports them and adds the kernel's own. Each class carries the HTTP status the APIs answer
it with (`status`, inherited from its base; mlbus/http.py is the one handler). Components
subclass a base and keep their classes in their own modules; the whole tree is drawn here.
The consumer loop acts on two: `TransientError` (retry with backoff) and `InvalidEvent`
(dead-letter).

    MlbusError                      500  root: anything mlbus raises on purpose
    ├── NotFound                    404  a name, version or object that does not exist
    │   ├── UnknownTopic            404  schemas/errors.py: not in the topic catalog
    │   ├── UnknownModel            404  no such model or version in the log, or not served here
    │   ├── UnknownDataset          404  no such dataset or version in the log
    │   ├── UnknownVersion          404  serving/errors.py: the model has no such loaded version
    │   ├── UnknownRequest          404  serving/errors.py: feedback for a request id this
    │   │                                replica did not answer
    │   ├── UnknownSearch           404  consumers/tuning/api.py: no such search on the log
    │   └── NotInLineage            404  consumers/lineage/store.py: not in the lineage store
    │                                    (also a LineageError)
    ├── Invalid                     400  can never succeed as given: retrying cannot fix it
    │   ├── InvalidEvent            400  schemas/errors.py: a record that cannot be decoded or
    │   │                                validated: the consumer loop dead-letters it
    │   ├── InvalidRef              400  refs.py: not `name` or `name@version`
    │   ├── StorageError            400  storage.py: an object-store operation that failed for
    │   │                                good (missing, forbidden, outside the allowed roots)
    │   ├── InvalidModelSpec        400  families.py: unknown family, bad hyperparameters, a
    │   │   │                            plugin that fails to import or build, a task it lacks
    │   │   └── FamilyUnavailable   400  families.py: a model's plugin family is not installed
    │   │                                here, or at another distribution version
    │   ├── InvalidTensorColumn     400  ml/tensors.py: ragged rows, nulls, no declared shape
    │   ├── InvalidSplit            400  ml/split.py: fractions that leave no row to train on
    │   ├── InvalidModelCard        400  ml/card.py: a card that lacks or mistypes a field
    │   ├── InvalidArtifact         400  artifacts.py: weights that are not safetensors or do
    │   │                                not fit the model their card describes
    │   ├── InvalidDataset          400  datasets/sources.py: unreadable or malformed input
    │   ├── InvalidTrainingRequest  400  trainer/data.py: nulls, one class, bad split
    │   │   ├── DeviceUnavailable   400  trainer/worker.py: a device this worker does not have
    │   │   ├── WorkersUnavailable  400  trainer/rendezvous.py: fewer workers joined a
    │   │   │                            `workers: N` run than it needs, in time
    │   │   ├── RendezvousUnreachable 400 trainer/rendezvous.py: a run's announced address
    │   │   │                            does not answer
    │   │   └── DatasetNotValidated 400  trainer/lookup.py: a version the validator refused,
    │   │                                or did not validate in time: never trained
    │   ├── InvalidPipeline         400  consumers/workflow/definitions.py: names the line
    │   ├── InvalidRollout          400  consumers/workflow/commands.py: weights that do not
    │   │                                sum to 100, steps out of order, a strategy's options
    │   │                                mixed up
    │   ├── InvalidSearch           400  search.py: an empty or contradictory search space, a
    │   │                                budget of zero, a name the family does not have
    │   ├── InvalidPath             400  a path, URI or key with a NUL byte (storage.py, http.py)
    │   ├── InvalidTime             422  consumers/lineage/store.py: an as-of time that is not
    │   │                                ISO 8601; 422 as FastAPI answers for the other query
    │   │                                parameters (also a LineageError)
    │   ├── InvalidRunQuery         422  consumers/lineage/runs.py: an unknown run status, a run
    │   │                                id prefix naming several runs (also a LineageError)
    │   ├── InvalidInput            400  serving/errors.py: a tensor that does not fit the card
    │   ├── MalformedRequest        400  serving/errors.py: not JSON, or not an inference request
    │   ├── InvalidFeedback         400  serving/errors.py: a label that is not a class of the
    │   │                                version that answered
    │   ├── UndecodableBody         400  http.py: a gzip or deflate body that does not inflate
    │   │   └── UnsupportedEncoding 415  http.py: a Content-Encoding other than gzip, deflate or
    │   │                                identity
    │   └── PayloadTooLarge         413  a request body over its limit (api.max_body_bytes,
    │       │                            api.max_upload_bytes, serving.max_body_bytes)
    │       └── TooManyRows         413  serving/errors.py: more input rows than
    │                                    serving.max_rows_per_request
    ├── Pruned                      500  trainer/pruning.py: a search's pruner stopped the run
    │                                    (the worker ends it with a pruned training.failed)
    ├── Conflict                    409  well formed, but contradicts the current state
    │   ├── PlatformRunning         409  lock.py: another `mlbus up` holds the data dir
    │   ├── NothingToRollBack       409  consumers/workflow/commands.py: no earlier good version
    │   ├── RolloutConflict         409  consumers/workflow/commands.py: a rollout in progress,
    │   │                                a candidate that is the serving version, failed to
    │   │                                load, or no champion to roll out against
    │   ├── TargetNotEmpty          409  consumers/archive/restore.py: the topic holds records
    │   └── NewLog                  409  kafka/anchor.py: a partition's log is not the one a
    │                                    store's positions belong to (positions.on_new_log)
    ├── Unauthorized                401  without the bearer token (mlbus/http.py `bearer_guard`)
    ├── TransientError              503  may succeed if retried (broker or store down): backoff
    │   ├── DeliveryError           503  the broker did not confirm a produced record
    │   ├── MemberLost              503  trainer/distributed.py: a data-parallel member went
    │   │                                away: the run restarts from its checkpoint
    │   └── NotReady                503  serving/errors.py: the model is loading, or the server
    │                                    is stopping
    ├── ConfigError                 500  a setting is wrong; the CLI prints one line and exits 2
    │   └── MissingExtra            500  extras.py: a command needs an extra that is not
    │                                    installed (names the pip install)
    ├── Abandon                     500  a handler stopped before finishing (shutdown): the
    │                                    record is not committed
    ├── BrokerError                 503  the embedded broker cannot be started or reached
    │   └── BrokerNotRunning        503  no broker configured and none running in the data dir
    ├── JournalError                500  journal/: the embedded log's journal cannot be used
    │   ├── JournalUnreadable       500  not a journal, or damaged before its tail (left as is)
    │   └── JournalTooNew           500  written by a newer mlbus (format version above ours)
    ├── HashMismatch                500  tables.py: stored bytes do not hash to what the event
    │                                    claims (or it claims no hash)
    ├── LineageError                500  consumers/lineage/store.py: the store cannot answer
    │   ├── NotInLineage            404  (drawn under NotFound)
    │   └── InvalidTime             422  (drawn under Invalid)
    ├── VerificationFailed          500  serving/errors.py: a promoted version that cannot be
    │                                    served (hash, card, warm-up)
    ├── ApiError                    500  client.py: the control-plane API answered an error
    │                                    (its own status is `http_status`)
    └── DemoFailed                  500  cli/demo_job.py: a step of the demo did not happen
"""

from __future__ import annotations

from mlbus.schemas.errors import (
    Conflict,
    Invalid,
    InvalidEvent,
    MlbusError,
    NotFound,
    TransientError,
    Unauthorized,
    UnknownTopic,
)

__all__ = [
    "Abandon",
    "BrokerError",
    "BrokerNotRunning",
    "ConfigError",
    "Conflict",
    "DeliveryError",
    "Invalid",
    "InvalidEvent",
    "InvalidPath",
    "JournalError",
    "JournalTooNew",
    "JournalUnreadable",
    "MlbusError",
    "NotFound",
    "PayloadTooLarge",
    "PlatformRunning",
    "TransientError",
    "Unauthorized",
    "UndecodableBody",
    "UnknownDataset",
    "UnknownModel",
    "UnknownTopic",
    "UnsupportedEncoding",
]


class ConfigError(MlbusError):
    """A setting is missing or wrong."""


class InvalidPath(Invalid):
    """A path, URI or object key that contains a NUL byte: no file system or store can name
    it, and the C libraries underneath would cut it short."""


class PayloadTooLarge(Invalid):
    """A request body larger than the limit of the endpoint it was sent to."""

    status = 413


class UndecodableBody(Invalid):
    """A request body whose Content-Encoding cannot be undone: corrupt or truncated data."""


class UnsupportedEncoding(UndecodableBody):
    """A request body in a Content-Encoding the server does not read."""

    status = 415


class DeliveryError(TransientError):
    """The broker did not confirm delivery of one or more records."""


class Abandon(MlbusError):
    """Raised by a handler that stops before finishing its record because the loop is
    stopping (`record.stopping`): the record is neither committed nor dead-lettered, the loop
    stops, and the record is delivered again (to this group) later."""


class BrokerError(MlbusError):
    """The embedded broker could not be started, reached or stopped."""

    status = 503


class BrokerNotRunning(BrokerError):
    """No Kafka cluster is configured and no embedded broker runs in the data dir."""


class PlatformRunning(Conflict):
    """Another `mlbus up` holds the data dir's lock: one platform per data dir."""


class JournalError(MlbusError):
    """The embedded log's journal (mlbus/journal/) cannot be read, written or restored."""


class JournalUnreadable(JournalError):
    """A journal file that is not a journal, or is damaged before its tail; it is left
    untouched (a torn tail alone is not this: it is reported and skipped)."""


class JournalTooNew(JournalError):
    """A journal written in a newer format than this mlbus reads; left untouched."""


# Shared by the components that look names up in the log (workflow, serving, trainer,
# dataset manager), which cannot import each other's classes.


class UnknownModel(NotFound):
    """No such model, or no such version of it, in the log; or not served on this replica."""


class UnknownDataset(NotFound):
    """No such dataset, or no such version of it, in the log."""
