"""The one codec of the contract: typed events to record bytes and back.

Writes CloudEvents JSON structured mode, with the Kafka binding's `partitionkey` extension
holding the record key. Reads structured mode, and binary mode (`ce_*` headers with the
payload as the value) as other systems emit it; which one a record is in is read from its
headers first, as the CloudEvents Kafka binding says (`content-type:
application/cloudevents…` is structured, else `ce_specversion` is binary, else structured),
so a record is parsed once. Every failure to read is an `InvalidEvent` whose reason names
the field, so the consumer loop can dead-letter it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol, cast

import orjson
from pydantic import ValidationError

from mlbus.schemas import dicts
from mlbus.schemas.base import Payload
from mlbus.schemas.catalog import ANY_EVENT, EVENT_MODELS, TOPICS, spec_for_payload
from mlbus.schemas.envelope import (
    STRUCTURED_CONTENT_TYPE,
    Event,
    dataschema_for,
    new_event_id,
    utcnow,
)
from mlbus.schemas.errors import InvalidEvent

#: Records larger than this are refused before parsing (the contract's events are small;
#: tensors and datasets travel by URI).
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
STRUCTURED_HEADERS = [("content-type", STRUCTURED_CONTENT_TYPE.encode())]

Headers = Sequence[tuple[str, bytes | None]] | None
_DATASCHEMA = {name: dataschema_for(name) for name in TOPICS}


class Cause(Protocol):
    """What a follow-up event needs of its cause: an `Event` or an `EventRef`."""

    @property
    def id(self) -> str: ...
    @property
    def correlationid(self) -> str | None: ...


class EventRef(NamedTuple):
    """Identity of an event the caller published (what `encode_new` returns beside bytes)."""

    id: str
    type: str
    key: str | None
    correlationid: str
    causationid: str | None


def attributes(
    event_type: str,
    *,
    source: str,
    subject: str | None = None,
    causation: Cause | None = None,
    correlationid: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
    partitionkey: str | None = None,
) -> dict[str, Any]:
    """The envelope attributes of a new event, absent ones left out. The correlation id is
    inherited from the causing event; an event with no cause starts a new correlation (its
    own id). `partitionkey` is the record key the event is published with."""
    event_id = event_id or new_event_id()
    if causation is not None:
        correlationid = correlationid or causation.correlationid or causation.id
    # Built in the envelope model's field order (the encoders must agree byte for byte).
    attrs: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": time or utcnow(),
    }
    if subject is not None:
        attrs["subject"] = subject
    attrs["datacontenttype"] = "application/json"
    attrs["dataschema"] = _DATASCHEMA.get(event_type) or dataschema_for(event_type)
    attrs["correlationid"] = correlationid or event_id
    if causation is not None:
        attrs["causationid"] = causation.id
    if partitionkey is not None:
        attrs["partitionkey"] = partitionkey
    return attrs


def key_text(key: str | bytes | None) -> str | None:
    """A record key as the `partitionkey` extension carries it (a string): None for no key
    or a key that is not UTF-8 (such a key cannot be a CloudEvents string attribute)."""
    if key is None or isinstance(key, str):
        return key
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


def wrap(data: Payload, *, source: str, **envelope: Any) -> Event:
    """Put a payload in its envelope (keyword arguments as for `attributes`; `partitionkey`
    defaults to the topic's key field)."""
    spec = spec_for_payload(data)
    envelope.setdefault("partitionkey", spec.key_of(data))
    attrs = attributes(spec.name, source=source, **envelope)
    return EVENT_MODELS[spec.name](**attrs, data=data)


def encode(event: Event) -> bytes:
    """Structured-mode JSON; absent optional attributes are omitted, as CloudEvents asks."""
    return event.__pydantic_serializer__.to_json(event, exclude_none=True)


def encode_new(data: Payload, *, source: str, **envelope: Any) -> tuple[EventRef, bytes]:
    """`encode(wrap(...))` without building the envelope model: the producer's hot path.

    The payload was validated when it was constructed and the envelope attributes are ours,
    so only serialization is left. Byte-identical to `encode(wrap(...))` (a property test
    holds it to that).
    """
    spec = spec_for_payload(data)
    envelope.setdefault("partitionkey", spec.key_of(data))
    attrs = attributes(spec.name, source=source, **envelope)
    body = data.__pydantic_serializer__.to_json(data, exclude_none=True)
    value = orjson.dumps(attrs, option=orjson.OPT_UTC_Z)[:-1] + b',"data":' + body + b"}"
    ref = EventRef(
        attrs["id"],
        spec.name,
        attrs.get("partitionkey", spec.key_of(data)),
        attrs["correlationid"],
        attrs.get("causationid"),
    )
    return ref, value


def decode(
    value: bytes | None,
    headers: Headers = None,
    *,
    expected_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Event:
    """Validate a record into its typed event, or raise `InvalidEvent` saying why.

    `expected_type` is the event type the record's topic carries (`type` equals the topic).
    """
    value = _check_size(value, max_bytes)
    binary = _binary_attributes(headers)
    if binary is not None:
        event = _decode_binary(value, binary, expected_type)
    else:
        try:
            model = EVENT_MODELS.get(expected_type) if expected_type is not None else None
            if model is not None:
                # The topic says which model: skip the union's dispatch (a mismatching
                # `type` fails here and is explained by the union below).
                try:
                    return model.model_validate_json(value)
                except ValidationError:
                    pass
            event = ANY_EVENT.validate_json(value)
        except ValidationError as e:
            raise InvalidEvent(describe(e)) from None
    if expected_type is not None and event.type != expected_type:
        raise InvalidEvent(f"event type {event.type!r} does not belong on topic {expected_type!r}")
    return event


def decode_dict(
    value: bytes | None,
    headers: Headers = None,
    *,
    expected_type: str,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> dict[str, Any]:
    """`decode` into plain dicts instead of models (schemas/dicts.py): the same rules, the
    same `InvalidEvent` reasons, and what `decode(...).model_dump()` holds (fields a record
    leaves out take their defaults). For consumers whose per-record cost matters: no model
    instances are built (what that saves: docs/contract.md)."""
    value = _check_size(value, max_bytes)
    model = EVENT_MODELS.get(expected_type)
    if model is None:
        raise InvalidEvent(f"unknown event type {expected_type!r}")
    binary = _binary_attributes(headers)
    document = value if binary is None else _binary_document(value, binary)
    try:
        return dicts.adapter(model).validate_json(document)
    except ValidationError:
        pass
    # Not a valid event of this type: `decode` says why.
    return decode(value, headers, expected_type=expected_type, max_bytes=max_bytes).model_dump()


def dict_decoder(
    expected_type: str, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> Callable[[bytes | None], dict[str, Any]]:
    """`decode_dict` of records without headers (structured mode), bound to one event type:
    the same dicts and the same `InvalidEvent`s, with the per-call lookups done once. For
    a consumer's per-record loop (streams/processor.py); a record it does not accept goes
    through `decode_dict` itself, which says why."""
    model = EVENT_MODELS.get(expected_type)
    if model is None:
        raise InvalidEvent(f"unknown event type {expected_type!r}")
    validate = dicts.adapter(model).validator.validate_json

    def decode_one(value: bytes | None) -> dict[str, Any]:
        if value is not None and len(value) <= max_bytes:
            try:
                return cast("dict[str, Any]", validate(value))
            except ValidationError:
                pass
        return decode_dict(value, expected_type=expected_type, max_bytes=max_bytes)

    return decode_one


def _check_size(value: bytes | None, max_bytes: int) -> bytes:
    if value is None:
        raise InvalidEvent("record has no value (a tombstone is not an event)")
    if len(value) > max_bytes:
        raise InvalidEvent(f"record value is {len(value)} bytes, over the {max_bytes}-byte limit")
    return value


def decode_payload(event_type: str, data: bytes | str) -> Payload:
    """Validate JSON `data` as the payload of `event_type` (used by `mlbus publish`)."""
    if event_type not in TOPICS:
        raise InvalidEvent(f"unknown event type {event_type!r}; known: {', '.join(TOPICS)}")
    model = TOPICS[event_type].payload
    try:
        payload = model.model_validate_json(data)
    except ValidationError as e:
        raise InvalidEvent(describe(e, prefix="data")) from None
    unknown = sorted(set(orjson.loads(data)) - set(model.model_fields))
    if unknown:
        raise InvalidEvent(
            f"data.{unknown[0]}: not a field of {event_type} "
            f"(fields: {', '.join(model.model_fields)})"
        )
    return payload


def _binary_attributes(headers: Headers) -> dict[str, str] | None:
    """The CloudEvents attributes a binary-mode record carries in its headers (`ce_<name>`,
    and `content-type` as `datacontenttype`); None for a structured-mode record. The Kafka
    binding: a `content-type` of `application/cloudevents…` means structured mode, else a
    `ce_specversion` header means binary mode, else the record is taken as structured (what
    a plain client that sets no header sends)."""
    if not headers:
        return None
    found: dict[str, str] = {}
    for key, raw in headers:
        if key[:3].lower() == "ce_":
            found[key[3:].lower()] = raw.decode("utf-8", "replace") if raw else ""
        elif key.lower() == "content-type":
            text = raw.decode("utf-8", "replace") if raw else ""
            if text[:23].lower() == "application/cloudevents":
                return None
            found["datacontenttype"] = text
    return found if "specversion" in found else None


def _binary_document(value: bytes, attributes: dict[str, str]) -> bytes:
    """The structured-mode document of a binary-mode record: its attributes with the raw
    payload spliced in as `data`, so that one strict JSON validation covers both parts."""
    content_type = attributes.setdefault("datacontenttype", "application/json")
    if "json" not in content_type:
        raise InvalidEvent(f"binary-mode event with non-JSON content type {content_type!r}")
    return orjson.dumps(attributes)[:-1] + b',"data":' + value + b"}"


def _decode_binary(value: bytes, attributes: dict[str, str], expected_type: str | None) -> Event:
    document = _binary_document(value, attributes)
    model = EVENT_MODELS.get(expected_type) if expected_type is not None else None
    if model is not None:  # as in structured mode: the topic says which model
        try:
            return model.model_validate_json(document)
        except ValidationError:
            pass
    try:
        return ANY_EVENT.validate_json(document)
    except ValidationError as e:
        raise InvalidEvent("binary mode: " + describe(e)) from None


def describe(error: ValidationError, prefix: str = "", limit: int = 3) -> str:
    """One line naming each failing field, e.g. `data.num_rows: Input should be ...`."""
    parts = []
    for item in error.errors(include_url=False)[:limit]:
        kind = item["type"]
        loc = [str(p) for p in item["loc"]]
        if kind == "json_invalid":
            parts.append(f"value is not valid JSON ({item['ctx'].get('error', '')})")
            continue
        if kind == "union_tag_invalid":
            tag = item["ctx"]["tag"]
            parts.append(f"type: unknown event type {tag!r}")
            continue
        if kind == "union_tag_not_found":
            parts.append("type: missing (a CloudEvent needs 'type')")
            continue
        if kind in ("dict_type", "model_attributes_type", "model_type") and not loc:
            parts.append("value is not a JSON object")
            continue
        if loc and loc[0] in EVENT_MODELS:
            loc = loc[1:]  # the discriminator's branch, not a field
        where = ".".join(([prefix] if prefix else []) + loc) or "value"
        got = item.get("input")
        shown = "" if kind == "missing" else f" (got {_short(got)})"
        parts.append(f"{where}: {item['msg']}{shown}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
