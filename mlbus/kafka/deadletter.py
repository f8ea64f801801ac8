"""Dead letters: a record a consumer could not process, kept whole on `mlbus.deadletter`
with where it came from and why, so nothing is dropped silently and it can be replayed."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from mlbus.kafka.config import MAX_RECORD_BYTES
from mlbus.schemas.deadletter import DeadLetter, Header, OriginalRecord

#: Originals up to this size (value, key and headers together) are copied into the dead
#: letter (base64 grows them by 4/3); larger values are referenced by topic, partition,
#: offset and sha256 only, and headers beyond MAX_COPIED_HEADER_BYTES are left out.
MAX_COPIED_BYTES = (MAX_RECORD_BYTES * 3) // 4 - 64 * 1024
MAX_COPIED_HEADER_BYTES = 256 * 1024


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


def dead_letter(
    message: Any,
    *,
    reason: str,
    error_type: str,
    consumer_group: str | None,
    consumer: str | None,
    copy: bool = True,
) -> DeadLetter:
    """Build the dead letter of a confluent-kafka `Message` (`copy=False`: metadata only)."""
    value: bytes | None = message.value()
    key: bytes | None = message.key()
    headers = message.headers() or []
    size = len(value) if value is not None else 0
    header_bytes = sum(len(k) + len(v or b"") for k, v in headers)
    if not copy or header_bytes > MAX_COPIED_HEADER_BYTES:
        reason += f" [{len(headers)} header(s), {header_bytes} bytes, not copied]"
        headers = []
        header_bytes = 0
    fits = size + len(key or b"") + header_bytes <= MAX_COPIED_BYTES
    copied = value if copy and fits else None
    if value is not None and copied is None:
        reason += (
            f" [original value of {size} bytes not copied; it stays at "
            f"{message.topic()}/{message.partition()}@{message.offset()}]"
        )
    ts_type, ts = message.timestamp()
    return DeadLetter(
        original=OriginalRecord(
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
            timestamp_ms=ts if ts_type else None,
            key_b64=_b64(key),
            value_b64=_b64(copied),
            value_size=size,
            value_sha256=hashlib.sha256(value).hexdigest() if value is not None else None,
            headers=[Header(key=k, value_b64=_b64(v)) for k, v in headers],
        ),
        reason=reason,
        error_type=error_type,
        consumer_group=consumer_group,
        consumer=consumer,
    )


def original_value(letter: DeadLetter) -> bytes | None:
    raw = letter.original.value_b64
    return None if raw is None else base64.b64decode(raw)
