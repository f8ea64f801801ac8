"""The contract of mlbus: the CloudEvents envelope, one payload model per topic, the topic
catalog, and the codec. Pure: no I/O."""

from __future__ import annotations

from mlbus.schemas.catalog import CATALOG, DEADLETTER, EVENT_MODELS, TOPICS, TopicSpec, topic
from mlbus.schemas.codec import decode, decode_payload, encode, wrap
from mlbus.schemas.envelope import Event

__all__ = [
    "CATALOG",
    "DEADLETTER",
    "EVENT_MODELS",
    "TOPICS",
    "Event",
    "TopicSpec",
    "decode",
    "decode_payload",
    "encode",
    "topic",
    "wrap",
]
