"""The streams app's decode of `inference.logged` records: every field validated by the
contract's rules, in one pydantic pass on the bytes.

The codec's `decode_dict` parses the bytes, then validates the object (schemas/dicts.py):
about 4 µs a record, a third of the app's CPU per record. `logged_decoder` validates the
same fields with the same rules (the TypedDicts below are derived from the contract's models,
field by field, never written by hand: types, strictness, constraints, defaults) straight
from the bytes, in about 2.8 µs, so the values the engine gets are the ones `decode_dict`
gives, and a record the contract refuses in any field is refused here too. A record it
refuses goes through `decode_dict`, whose reason the processor dead-letters it with.

tests/streams/test_logged.py: on valid records both give the same values; on records broken
anywhere both refuse, with the codec's reason; `READ` holds every payload field the engine
reads (checked against the source of `Agg.add` and `Engine.apply`).
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
#: The payload fields validated: all of them (the window engine reads a part: `Engine.apply`,
#: `Agg.add`; the rest are checked so that no invalid record is aggregated instead of
#: dead-lettered).
READ = frozenset(InferenceLogged.model_fields)
#: The envelope attributes validated (`data` is the payload above).
ENVELOPE_READ = frozenset(EVENT_MODELS[EVENT_TYPE].model_fields) - {"data"}


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
    """Validates an `inference.logged` event: the envelope's `ENVELOPE_READ`, the payload's
    `READ`."""
    payload = _subset(InferenceLogged, READ, "InferenceLoggedRead")
    envelope = EVENT_MODELS[EVENT_TYPE]
    event = _subset(envelope, ENVELOPE_READ, "InferenceLoggedEventRead", data=payload)
    return TypeAdapter(event)


def logged_decoder(
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
) -> Callable[[bytes | None], dict[str, Any]]:
    """A decoder of structured-mode `inference.logged` records into dicts holding what the
    contract validates (`data` with the payload's `READ` fields, defaults filled in as
    `decode_dict` fills them). A record it refuses is passed to `decode_dict`, which
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
