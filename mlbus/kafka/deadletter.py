"""Dead letters: a record a consumer could not process, kept whole on `mlbus.deadletter`
with where it came from and why, so nothing is dropped silently and it can be replayed.

Besides mlbus's envelope, each dead letter carries the headers generic Kafka tools look
for on a dead-letter queue: Kafka Connect's `__connect.errors.*` (original topic,
partition, offset, exception class and message)."""

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
#: Kafka Connect's dead-letter-queue header names (its `DeadLetterQueueReporter`).
CONNECT_HEADER_PREFIX = "__connect.errors."
#: The reason is whole in the payload; the header keeps a bounded copy for generic tools.
MAX_MESSAGE_HEADER_BYTES = 4096


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


def dead_letter_headers(letter: DeadLetter) -> list[tuple[str, bytes | None]]:
    """The conventional dead-letter headers of `letter`, values as UTF-8 text as Kafka
    Connect writes them."""
    original = letter.original
    message = letter.reason.encode("utf-8")
    if len(message) > MAX_MESSAGE_HEADER_BYTES:
        message = message[: MAX_MESSAGE_HEADER_BYTES - 3].decode("utf-8", "ignore").encode()
        message += b"..."
    fields = {
        "topic": original.topic.encode(),
        "partition": str(original.partition).encode(),
        "offset": str(original.offset).encode(),
        "exception.class.name": letter.error_type.encode(),
        "exception.message": message,
    }
    return [(CONNECT_HEADER_PREFIX + name, value) for name, value in fields.items()]


def original_value(letter: DeadLetter) -> bytes | None:
    raw = letter.original.value_b64
    return None if raw is None else base64.b64decode(raw)
