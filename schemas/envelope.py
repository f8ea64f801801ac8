"""The CloudEvents 1.0 envelope every record value carries (JSON structured mode).

`Event[P]` is generic over the payload; the catalog derives one concrete model per topic
whose `type` is that topic's name, so that a single JSON parse both finds and validates the
payload model (a discriminated union on `type`).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Final, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from mlbus.schemas.base import Payload

P = TypeVar("P", bound=Payload)

SPECVERSION: Final = "1.0"
#: Content type of a structured-mode record (Kafka header `content-type`).
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
#: Major version of the contract; `dataschema` is `mlbus:schemas/<type>/<major>`.
SCHEMA_MAJOR = 1


def new_event_id() -> str:
    """A random (version 4) UUID string; several times faster than `str(uuid.uuid4())`."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def dataschema_for(event_type: str) -> str:
    return f"mlbus:schemas/{event_type}/{SCHEMA_MAJOR}"


class Event(BaseModel, Generic[P]):
    """A CloudEvents 1.0 event. Extension attributes other systems add are kept (extra)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="allow")

    specversion: Literal["1.0"] = SPECVERSION
    id: str = Field(min_length=1, description="unique; the idempotency key")
    source: str = Field(min_length=1, description="the producing service, e.g. mlbus/datasets")
    type: str = Field(description="equals the topic name")
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str | None = "application/json"
    dataschema: str | None = None
    correlationid: str | None = Field(
        default=None, description="shared by every event of one pipeline run"
    )
    causationid: str | None = Field(default=None, description="id of the event that caused this")
    partitionkey: str | None = Field(
        default=None,
        description="the record's key (the CloudEvents Kafka binding's partitionkey extension)",
    )
    data: P
