"""The contract as an AsyncAPI 3.0 document (`schemas/asyncapi.yaml`, written by `make
schemas` beside the JSON Schemas): one channel per topic of the catalog with its Kafka
bindings (partitions, replicas, retention, cleanup, record key), one message per topic whose
payload references the topic's JSON Schema file, and the operations that send and receive it.

AsyncAPI tooling (documentation, code generators, catalogs) reads this; the JSON Schemas
stay the source of truth for the payloads, and tests/schemas validates the document with the
AsyncAPI parser.
"""

from __future__ import annotations

from typing import Any

import yaml

from mlbus.schemas.catalog import CATALOG, DEADLETTER, TopicSpec
from mlbus.schemas.envelope import SCHEMA_MAJOR, STRUCTURED_CONTENT_TYPE

#: The Kafka bindings' version the document is written against.
KAFKA_BINDING = "0.5.0"
#: Kafka Connect's dead-letter headers, which `mlbus.deadletter` records carry too.
CONNECT_HEADERS = ("topic", "partition", "offset", "exception.class.name", "exception.message")
HEADER = (
    "# Generated from schemas/catalog.py by `make schemas` (python -m mlbus.schemas.generate);\n"
    "# do not edit. Payload schemas: schemas/json/.\n"
)


def _message_id(spec: TopicSpec) -> str:
    return spec.name.replace(".", "-")


def _channel(spec: TopicSpec) -> dict[str, Any]:
    configs = spec.configs()
    topic_configuration: dict[str, Any] = {
        "cleanup.policy": configs["cleanup.policy"].split(","),
        "retention.ms": spec.retention_ms,
    }
    if spec.max_message_bytes:
        topic_configuration["max.message.bytes"] = spec.max_message_bytes
    return {
        "address": spec.name,
        "title": spec.name,
        "description": f"{spec.description}. Published by: {spec.published_by}.",
        "messages": {_message_id(spec): {"$ref": f"#/components/messages/{_message_id(spec)}"}},
        "bindings": {
            "kafka": {
                "topic": spec.name,
                "partitions": spec.partitions,
                "replicas": spec.replication,
                "topicConfiguration": topic_configuration,
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }


def _headers(spec: TopicSpec) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "content-type": {
            "type": "string",
            "const": STRUCTURED_CONTENT_TYPE,
            "description": "CloudEvents structured mode (binary mode, `ce_*` headers with "
            "the payload as the value, is accepted on input)",
        }
    }
    if spec.name == DEADLETTER:
        for name in CONNECT_HEADERS:
            properties[f"__connect.errors.{name}"] = {
                "type": "string",
                "description": f"the failed record's {name} (Kafka Connect's dead-letter header)",
            }
    return {"type": "object", "properties": properties}


def _key(spec: TopicSpec) -> dict[str, Any]:
    if spec.key is None:
        return {"type": "string", "description": "the key of the original record, as it was"}
    return {
        "type": "string",
        "description": f"the payload's `{spec.key}`; also the event's `partitionkey`",
    }


def _message(spec: TopicSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "title": spec.name,
        "summary": spec.description,
        "contentType": STRUCTURED_CONTENT_TYPE,
        "headers": _headers(spec),
        "correlationId": {
            "description": "shared by every event of one pipeline run",
            "location": "$message.payload#/correlationid",
        },
        "payload": {
            "schemaFormat": "application/schema+json;version=draft-07",
            "schema": {"$ref": f"./json/{spec.name}.v{SCHEMA_MAJOR}.json"},
        },
        "bindings": {"kafka": {"key": _key(spec), "bindingVersion": KAFKA_BINDING}},
    }


def document() -> dict[str, Any]:
    """The AsyncAPI document of the catalog, as a mapping."""
    channels = {spec.name: _channel(spec) for spec in CATALOG}
    operations: dict[str, Any] = {}
    for spec in CATALOG:
        ref = {"$ref": f"#/channels/{spec.name}"}
        message = [{"$ref": f"#/channels/{spec.name}/messages/{_message_id(spec)}"}]
        operations[f"send-{_message_id(spec)}"] = {
            "action": "send",
            "channel": ref,
            "summary": f"published by {spec.published_by}",
            "messages": message,
        }
        operations[f"receive-{_message_id(spec)}"] = {
            "action": "receive",
            "channel": ref,
            "summary": "read by any consumer (mlbus's services, or any Kafka client)",
            "messages": message,
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "mlbus",
            "version": f"{SCHEMA_MAJOR}.0.0",
            "description": "The topics of mlbus, an event-driven deep-learning platform on a "
            "Kafka log. Every record value is a CloudEvents 1.0 event in JSON structured "
            "mode whose `type` equals the topic name and whose `partitionkey` is the "
            "record key.",
        },
        "defaultContentType": STRUCTURED_CONTENT_TYPE,
        "servers": {
            "compose": {
                "host": "localhost:19092",
                "protocol": "kafka",
                "description": "the 3-broker cluster of infra/docker-compose.yml, from the host "
                "(MLBUS_TOPIC_PREFIX, when set, prefixes every address)",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": {_message_id(s): _message(s) for s in CATALOG}},
    }


def render() -> str:
    return HEADER + yaml.safe_dump(document(), sort_keys=False, width=100, allow_unicode=True)
