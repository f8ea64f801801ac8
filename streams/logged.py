"""The streams app's decode of `inference.logged` records: validate what the window engine
reads, nothing else.

The codec's `decode_dict` validates every field of the event (schemas/dicts.py): about 4 µs
a record, a third of the app's CPU per record. The engine reads the event's `type` and
`time` and, of the payload, the fields in `READ`; `logged_decoder` validates those alone —
with the contract's own rules for them (the TypedDict below is derived from the models,
field by field, never written by hand: types, strictness, constraints, defaults), so the
values the engine gets are the ones `decode_dict` gives — in one pydantic pass on the bytes,
about half the time. What it does not look at (the envelope's `id` and `source`, the
payload's `request_id`, `replica`, `error`, `batch_size`, `shadow`, `answered_by`) cannot
change a window. A record it refuses goes through `decode_dict`, whose reason the processor
dead-letters it with (a record the contract refuses in a field the engine reads is refused
here too: the rules are the same).

tests/streams/test_logged.py: on valid records both give the same values; on records broken
in a read field both refuse, with the codec's reason; `READ` holds every payload field the
engine reads (checked against the source of `Agg.add` and `Engine.apply`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from mlbus.schemas import dicts
from mlbus.schemas.catalog import EVENT_MODELS
from mlbus.schemas.codec import DEFAULT_MAX_EVENT_BYTES, decode_dict
from mlbus.schemas.serving import InferenceLogged

EVENT_TYPE = "inference.logged"
#: The payload fields the window engine reads (streams/windows.py `Engine.apply`, `Agg.add`).
READ = frozenset(
    (
        "model",
        "version",
        "latency_seconds",
        "ok",
        "status",
        "agreement",
        "predictions",
        "feature_names",
        "inputs",
    )
)
#: The envelope attributes the processor reads (`data` is the payload above).
ENVELOPE_READ = frozenset(("type", "time"))


def _subset(model: Any, fields: frozenset[str], name: str, **replace: Any) -> Any:
    """The contract's TypedDict of `model` (schemas/dicts.py) with only `fields` (and
    `replace`'s, whose annotations are given); other keys of a record are ignored."""
    full = dicts.typed_dict(model)
    annotations = {k: v for k, v in full.__annotations__.items() if k in fields}
    missing = fields - set(annotations)
    if missing:
        raise TypeError(f"{model.__name__} has no field {sorted(missing)}")
    annotations.update(replace)
    td: Any = TypedDict(name, annotations)  # type: ignore[misc]  # built at run time
    td.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]  # where pydantic reads a TypedDict's config
        strict=full.__pydantic_config__.get("strict", False), extra="ignore"
    )
    return td


def read_adapter() -> TypeAdapter[Any]:
    """Validates an `inference.logged` event's `type`, `time` and the payload's `READ`."""
    payload = _subset(InferenceLogged, READ, "InferenceLoggedRead")
    envelope = EVENT_MODELS[EVENT_TYPE]
    event = _subset(envelope, ENVELOPE_READ, "InferenceLoggedEventRead", data=payload)
    return TypeAdapter(event)


def logged_decoder(
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Callable[[bytes | None], dict[str, Any]]:
    """A decoder of structured-mode `inference.logged` records into dicts holding what the
    engine reads (`type`, `time`, `data` with the payload's `READ` fields, defaults filled in
    as `decode_dict` fills them). A record it refuses is passed to `decode_dict`, which
    raises `InvalidEvent` with the contract's reason."""
    validate = read_adapter().validator.validate_json

    def decode(value: bytes | None) -> dict[str, Any]:
        if value is not None and len(value) <= max_bytes:
            try:
                return cast("dict[str, Any]", validate(value))
            except ValidationError:
                pass
        return decode_dict(value, expected_type=EVENT_TYPE, max_bytes=max_bytes)

    return decode
