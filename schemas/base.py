"""Building blocks shared by every payload model of the contract.

Payloads are frozen and strict (no type coercion: "12" is not an int), and ignore fields
they do not know, so that a consumer built against an older revision keeps reading events
from a producer that added an optional field (the only kind of change the contract allows).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

#: Names of datasets and models: they are record keys, path segments and CLI arguments.
Name = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="letters, digits, '.', '_' or '-'; starts with a letter or digit",
    ),
]
NonEmpty = Annotated[str, Field(min_length=1)]
Sha256 = Annotated[
    str,
    Field(pattern=r"^sha256:[0-9a-f]{64}$", description="'sha256:' and 64 lowercase hex digits"),
]


class Payload(BaseModel):
    """Base of every topic's payload (the CloudEvent's `data`)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")


class Part(BaseModel):
    """Base of the nested objects inside payloads; same rules as `Payload`."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")


class DatasetRef(Part):
    """One immutable version of a dataset."""

    name: Name
    version: NonEmpty


class PolicyRef(Part):
    """The promotion policy (and its revision) a decision was taken under."""

    name: NonEmpty
    version: int = Field(ge=1)


class Tensor(Part):
    """A tensor in Open Inference Protocol v2 form: flat row-major `data` with its `shape`."""

    name: NonEmpty
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: Annotated[
        str,
        Field(
            pattern=r"^(BOOL|UINT8|UINT16|UINT32|UINT64|INT8|INT16|INT32|INT64|FP16|FP32|FP64|BYTES)$"
        ),
    ]
    data: list[float | int | bool | str]
