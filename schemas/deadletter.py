"""Payload of `mlbus.deadletter`: a record some consumer could not process, kept whole."""

from __future__ import annotations

from pydantic import Field

from mlbus.schemas.base import NonEmpty, Part, Payload


class Header(Part):
    key: str
    value_b64: str | None = None


class OriginalRecord(Part):
    topic: NonEmpty
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    timestamp_ms: int | None = None
    key_b64: str | None = None
    value_b64: str | None = Field(default=None, description="the original value bytes, base64")
    value_size: int = Field(ge=0)
    value_sha256: str | None = None
    headers: list[Header] = []


class DeadLetter(Payload):
    original: OriginalRecord
    reason: NonEmpty
    error_type: NonEmpty
    consumer_group: str | None = None
    consumer: str | None = Field(default=None, description="the service that gave up on it")
