"""Topic provisioning from the catalog (`mlbus topics apply`): create what is missing,
report what differs, never alter or delete. Idempotent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AdminClient,
    ClusterMetadata,
    ConfigResource,
    NewTopic,
    TopicMetadata,
)

from mlbus.errors import TransientError
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.catalog import CATALOG, TopicSpec


@dataclass(frozen=True)
class TopicStatus:
    topic: str
    status: str  # created | ok | differs | missing
    partitions: int | None
    replication: int | None
    detail: str = ""


def _admin(kafka: KafkaConfig) -> AdminClient:
    return AdminClient(kafka.admin())


def _metadata(admin: AdminClient, kafka: KafkaConfig, timeout: float = 10.0) -> ClusterMetadata:
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
        replication = spec.replication_on(brokers)
        existing = metadata.topics.get(name)
        if existing is None or existing.error is not None:
            to_create[name] = (spec, replication)
        else:
            results.append(_compare(admin, spec, name, existing, timeout))
    if to_create:
        futures = admin.create_topics(
            [
                NewTopic(name, spec.partitions, replication, config=spec.configs(replication))
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
    admin: AdminClient, spec: TopicSpec, name: str, existing: TopicMetadata, timeout: float
) -> TopicStatus:
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
    for key, wanted in spec.configs(replication).items():
        entry = configs.get(key)
        have = entry.value if entry is not None else None
        if have is not None and have != wanted:
            differences.append(f"{key}={have} (catalog {wanted})")
        elif have is None:
            differences.append(f"{key} not set (catalog {wanted})")
    status = "differs" if differences else "ok"
    return TopicStatus(name, status, partitions, replication, "; ".join(differences))


def topic_names(kafka: KafkaConfig, timeout: float = 10.0) -> set[str]:
    """The names of the cluster's topics (a metadata request for all topics, which never
    creates one); `TransientError` when the cluster cannot be reached."""
    metadata = _metadata(_admin(kafka), kafka, timeout)
    return {name for name, topic in metadata.topics.items() if topic.error is None}


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
        t
        for t in metadata.topics
        if t not in names and t.startswith(kafka.topic_prefix) and not t.startswith("__")
    )
    return statuses, others


class TopicDefinition(TypedDict):
    """One topic as `infra/` provisions it (each `mlbus topics export` format)."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    key: str
    description: str


def topic_definitions(
    replication: int = 3, catalog: tuple[TopicSpec, ...] = CATALOG, prefix: str = ""
) -> list[TopicDefinition]:
    """The catalog as topic definitions for a cluster of at least `replication` brokers
    (what `infra/` provisions with: `mlbus topics export`)."""
    return [
        {
            "name": prefix + spec.name,
            "partitions": spec.partitions,
            "replication_factor": replication,
            "configs": spec.configs(replication),
            "key": spec.key or "(original key)",
            "description": spec.description,
        }
        for spec in catalog
    ]


def create_topics_script(definitions: list[TopicDefinition]) -> str:
    """A POSIX shell script creating `definitions` with Apache Kafka's `kafka-topics.sh`,
    idempotently (`--if-not-exists`); `$BOOTSTRAP` names the cluster."""
    lines = [
        "#!/bin/sh",
        "# Generated from the topic catalog (schemas/catalog.py) by `mlbus topics export",
        "# --format sh`; do not edit. Creates every contract topic that is missing.",
        "set -eu",
        ': "${BOOTSTRAP:=kafka-1:9092}"',
        ': "${KAFKA_TOPICS:=/opt/kafka/bin/kafka-topics.sh}"',
    ]
    for d in definitions:
        configs = " ".join(f"--config {k}={v}" for k, v in d["configs"].items())
        lines.append(
            f'"$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists '
            f"--topic {d['name']} --partitions {d['partitions']} "
            f"--replication-factor {d['replication_factor']} {configs}"
        )
    return "\n".join(lines) + "\n"


def strimzi_topics(definitions: list[TopicDefinition], cluster: str = "mlbus") -> str:
    """`definitions` as Strimzi `KafkaTopic` resources (Kubernetes), one YAML document each."""
    import yaml

    docs = [
        {
            "apiVersion": "kafka.strimzi.io/v1",
            "kind": "KafkaTopic",
            "metadata": {
                # Kubernetes names allow no '.' at the ends and no '_': the real name is in
                # spec.topicName.
                "name": str(d["name"]).replace(".", "-").replace("_", "-").lower(),
                "namespace": "mlbus",
                "labels": {"strimzi.io/cluster": cluster},
            },
            "spec": {
                "topicName": d["name"],
                "partitions": d["partitions"],
                "replicas": d["replication_factor"],
                "config": d["configs"],
            },
        }
        for d in definitions
    ]
    header = "# Generated from schemas/catalog.py by `mlbus topics export --format strimzi`.\n"
    return header + yaml.safe_dump_all(docs, sort_keys=False)
