"""Payload of `dataset.created`: a new immutable dataset version exists."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlbus.schemas.base import DatasetRef, Name, NonEmpty, Part, Payload, Sha256


class ColumnSchema(Part):
    name: NonEmpty
    type: NonEmpty = Field(description="Arrow type, as pyarrow prints it (int64, float32, string)")
    nullable: bool = True


class Histogram(Part):
    edges: list[float] = Field(description="bin edges, one more than counts")
    counts: list[int]


class ValueCount(Part):
    value: str
    count: int = Field(ge=0)


class ColumnStats(Part):
    """Per-column statistics: the training baseline drift detection compares against."""

    kind: Literal["numeric", "categorical", "other"]
    null_count: int = Field(ge=0)
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    histogram: Histogram | None = None
    distinct_count: int | None = None
    top_values: list[ValueCount] | None = None


VERSION_DESCRIPTION = (
    "names one immutable content of the dataset, forever: 1 to 128 letters, digits, '.', '_' "
    "or '-', starting with a letter or digit. mlbus uses the 64 hex digits of the sha256 of "
    "the canonical content; an upstream publisher may use its own token (a date such as "
    "2026-11-21, a run or release id) or the content hash's digits, but 64 hex digits must be "
    "the content hash's. The validator refuses another format, and a re-announcement of a "
    "name@version with a different content_hash (announce new content under a new version)"
)


class DatasetCreated(Payload):
    name: Name
    version: NonEmpty = Field(description=VERSION_DESCRIPTION)
    uri: NonEmpty = Field(description="where the Parquet data lives (file://, s3://)")
    format: Literal["parquet"] = "parquet"
    content_hash: Sha256 = Field(description="sha256 of the stored bytes at `uri`")
    arrow_schema: list[ColumnSchema]
    num_rows: int = Field(ge=0)
    num_bytes: int = Field(ge=0)
    columns: dict[str, ColumnStats] = {}
    label_column: str | None = None
    tags: dict[str, str] = {}
    description: str | None = None
    parents: list[DatasetRef] = []
    created_by: str | None = None


class DatasetValidated(Payload):
    """A `dataset.created` was checked against the bytes it points at: readable Parquet,
    the content hash, the schema and the row count all match. Downstream consumers (the
    training trigger) act on this, so a bad announcement never reaches them."""

    name: Name
    version: NonEmpty
    uri: NonEmpty
    content_hash: Sha256
    num_rows: int = Field(ge=0)
    validator: NonEmpty
    checks: list[str] = []
    tags: dict[str, str] = Field(default={}, description="copied from the dataset.created")
    label_column: str | None = None
    columns: dict[str, ColumnStats] = Field(
        default={},
        description="column statistics, the drift baseline: the dataset.created's, or "
        "computed by the validator from the bytes when it had none (stats_computed)",
    )
    stats_computed: bool = Field(
        default=False, description="true when the validator computed `columns` itself"
    )
    arrow_schema: list[ColumnSchema] = Field(
        default=[],
        description="the checked columns, copied from the dataset.created (what a trainer "
        "reads); empty in events published before this field existed",
    )
