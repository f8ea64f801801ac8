"""Topic provisioning from the catalog (`mlbus topics apply`): create what is missing,
report what differs, never alter or delete. Idempotent."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from schemas.catalog import CATALOG, TopicSpec


@dataclass(frozen=True)
class TopicStatus:
    topic: str
    status: str  # created | ok | differs | missing
    partitions: int | None
    replication: int | None
    detail: str = ""


def _admin(kafka: KafkaConfig) -> AdminClient:
    return AdminClient(kafka.admin())


def _metadata(admin: AdminClient, kafka: KafkaConfig, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise TransientError(
            f"cannot reach Kafka at {kafka.bootstrap}: {e.args[0].str()}"
        ) from None


def apply_topics(
    kafka: KafkaConfig, catalog: tuple[TopicSpec, ...] = CATALOG, timeout: float = 30.0
) -> list[TopicStatus]:
    """Create every catalog topic that is missing; report the ones that differ."""
    admin = _admin(kafka)
    metadata = _metadata(admin, kafka)
    brokers = max(1, len(metadata.brokers))
    results: list[TopicStatus] = []
    to_create: dict[str, tuple[TopicSpec, int]] = {}
    for spec in catalog:
        name = kafka.topic(spec.name)
        # A cluster smaller than the catalog's replication gets what it can hold.
        replication = min(spec.replication, brokers)
        existing = metadata.topics.get(name)
        if existing is None or existing.error is not None:
            to_create[name] = (spec, replication)
        else:
            results.append(_compare(admin, spec, name, existing, timeout))
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(name, spec.partitions, replication, config=spec.configs())
                for name, (spec, replication) in to_create.items()
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, future in futures.items():
            spec, replication = to_create[name]
            try:
                future.result()
                results.append(TopicStatus(name, "created", spec.partitions, replication))
            except KafkaException as e:
                error = e.args[0]
                if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:  # created meanwhile
                    results.append(TopicStatus(name, "ok", spec.partitions, replication))
                else:
                    raise TransientError(f"cannot create topic {name}: {error.str()}") from None
    order = {kafka.topic(spec.name): i for i, spec in enumerate(catalog)}
    return sorted(results, key=lambda r: order[r.topic])


def _compare(
    admin: AdminClient, spec: TopicSpec, name: str, existing, timeout: float
) -> TopicStatus:  # type: ignore[no-untyped-def]
    partitions = len(existing.partitions)
    replication = len(next(iter(existing.partitions.values())).replicas) if partitions else None
    differences = []
    if partitions != spec.partitions:
        differences.append(f"{partitions} partitions (catalog {spec.partitions})")
    resource = ConfigResource(ConfigResource.Type.TOPIC, name)
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout)[resource].result()
    except KafkaException:
        configs = {}
    for key, wanted in spec.configs().items():
        entry = configs.get(key)
        have = entry.value if entry is not None else None
        if have is not None and have != wanted:
            differences.append(f"{key}={have} (catalog {wanted})")
        elif have is None:
            differences.append(f"{key} not set (catalog {wanted})")
    status = "differs" if differences else "ok"
    return TopicStatus(name, status, partitions, replication, "; ".join(differences))


def list_topics(
    kafka: KafkaConfig, catalog: tuple[TopicSpec, ...] = CATALOG
) -> tuple[list[TopicStatus], list[str]]:
    """Status of every catalog topic, and the names of topics outside the catalog."""
    admin = _admin(kafka)
    metadata = _metadata(admin, kafka)
    statuses = []
    names = set()
    for spec in catalog:
        name = kafka.topic(spec.name)
        names.add(name)
        existing = metadata.topics.get(name)
        if existing is None or existing.error is not None:
            statuses.append(TopicStatus(name, "missing", None, None))
        else:
            statuses.append(_compare(admin, spec, name, existing, 10.0))
    others = sorted(
        t for t in metadata.topics
        if t not in names and t.startswith(kafka.topic_prefix) and not t.startswith("__")
    )  # fmt: skip
    return statuses, others
