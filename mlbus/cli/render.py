"""How records look on a terminal and as JSON lines (`mlbus tail`, `mlbus deadletters`)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import orjson
from rich.markup import escape

from mlbus.errors import InvalidEvent
from mlbus.kafka.consumer import Consumed
from mlbus.schemas.codec import decode
from mlbus.schemas.envelope import Event


def decode_record(message: Consumed, expected_type: str | None, max_bytes: int) -> Event | str:
    """The typed event of a record, or the reason it is not one."""
    try:
        return decode(
            message.value(), message.headers(), expected_type=expected_type, max_bytes=max_bytes
        )
    except InvalidEvent as e:
        return e.reason


def printable(raw: bytes | None) -> str | None:
    """Record bytes as text: UTF-8 when they are, else `base64:…`."""
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(raw).decode("ascii")


def _timestamp(message: Consumed) -> str | None:
    kind, ts = message.timestamp()
    if not kind:
        return None
    return datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds")


def as_json(message: Consumed, decoded: Event | str, preview: int | None = None) -> bytes:
    """One JSON line: where the record is, and the event or the reason it is invalid."""
    out: dict[str, Any] = {
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": _timestamp(message),
        "key": printable(message.key()),
    }
    if isinstance(decoded, str):
        raw = printable(message.value())
        out["invalid"] = decoded
        out["raw"] = raw if preview is None or raw is None else raw[:preview]
    else:
        out["event"] = decoded.model_dump(mode="json", exclude_none=True)
    return orjson.dumps(out)


def as_line(message: Consumed, decoded: Event | str, width: int = 160) -> str:
    """One rich-markup line for a terminal."""
    where = f"[dim]{message.partition()}@{message.offset()}[/]"
    when = (_timestamp(message) or "-")[:23]
    key = escape(printable(message.key()) or "-")
    if isinstance(decoded, str):
        raw = printable(message.value()) or "(no value)"
        return (
            f"{where} {when} [bold]{key}[/] [red]INVALID[/] {escape(decoded)} "
            f"[dim]{escape(raw[:80])}[/]"
        )
    data = orjson.dumps(decoded.data.model_dump(mode="json", exclude_none=True)).decode()
    if len(data) > width:
        data = data[: width - 1] + "…"
    return (
        f"{where} {when} [bold]{key}[/] [cyan]{decoded.type}[/] [dim]{decoded.id}[/] {escape(data)}"
    )
