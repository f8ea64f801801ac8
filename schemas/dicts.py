"""The contract's event models as TypedDicts, for consumers on a hot path.

`mlbus.schemas.codec.decode` returns typed model instances; building them is part of its time
(`decode_dict` saves that part: docs/contract.md). `decode_dict`
validates the same bytes against the same rules and returns plain dicts: the TypedDicts
here are derived from the models field by field (types, constraints, required or not,
defaults, strictness, extra fields), never written by hand, so there is one contract.
tests/schemas/test_dicts.py checks that both accept and refuse the same records and give
the same values.

What differs from the models: nested models are dicts too, and the dicts are mutable. A
field a record leaves out takes the model's default, as in the model, so that a dict holds
what `model_dump()` of the model holds. The contract has no custom validators; a model that
gains one is refused here (`TypeError` at import), so the two can never disagree silently.
"""

from __future__ import annotations

import types
from functools import cache
from typing import Annotated, Any, Literal, NotRequired, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict


def _refuse_validators(model: type[BaseModel]) -> None:
    decorators = model.__pydantic_decorators__
    custom = [
        *decorators.validators,
        *decorators.field_validators,
        *decorators.root_validators,
        *decorators.model_validators,
        *decorators.computed_fields,
    ]
    if custom:
        raise TypeError(f"{model.__name__} has custom validators: no dict form ({custom})")


@cache
def typed_dict(model: type[BaseModel]) -> Any:
    """The TypedDict of `model` (cached: nested models are shared)."""
    _refuse_validators(model)
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if info.alias not in (None, name):
            raise TypeError(f"{model.__name__}.{name} has an alias: no dict form")
        annotation = _convert(info.annotation)
        metadata = list(info.metadata)
        if not info.is_required():  # pydantic fills it in where a record leaves it out
            if info.default_factory is not None:
                metadata.append(Field(default_factory=info.default_factory))
            elif isinstance(info.default, BaseModel):  # in its dict form, as model_dump gives
                metadata.append(Field(default=info.default.model_dump()))
            else:  # pydantic copies a mutable one for each record
                metadata.append(Field(default=info.default))
        if metadata:
            annotation = Annotated[(annotation, *metadata)]
        fields[name] = annotation if info.is_required() else NotRequired[annotation]
    td: Any = TypedDict(f"{model.__name__}Dict", fields)  # type: ignore[misc]  # built at run time
    config = model.model_config
    td.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]  # where pydantic reads a TypedDict's config
        strict=config.get("strict", False), extra=config.get("extra") or "ignore"
    )
    return td


def _convert(annotation: Any) -> Any:
    """`annotation` with every model in it replaced by its TypedDict."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return typed_dict(annotation)
    origin = get_origin(annotation)
    if origin is None or origin is Literal:
        return annotation
    args = get_args(annotation)
    if origin is Annotated:
        return Annotated[(_convert(args[0]), *annotation.__metadata__)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_convert(a) for a in args)]  # noqa: UP007
    if origin in (list, dict, tuple, set, frozenset):
        converted = tuple(_convert(a) for a in args)
        return origin[converted] if len(converted) > 1 else origin[converted[0]]
    raise TypeError(f"no dict form for {annotation!r}")


@cache
def adapter(event_model: type[BaseModel]) -> TypeAdapter[Any]:
    return TypeAdapter(typed_dict(event_model))
