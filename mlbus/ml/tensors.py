"""Tensor columns of a dataset: one feature column holding a tensor per row, an Arrow
fixed-size list (shape [size] unless declared) or a list whose shape is declared in the
field's metadata (`shape`: "[1, 8, 8]"). The trainer reads its rows as [N, *shape]; the
workflow does the same when it re-evaluates a champion. No topics here."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlbus.errors import Invalid


class InvalidTensorColumn(Invalid):
    """A tensor column that cannot feed a model: rows of different lengths, nulls, no
    declared shape, not numbers. Not retryable."""


def tensor_shape(schema: pa.Schema, features: Sequence[str]) -> list[int] | None:
    """One sample's shape when the features are one tensor column, else None (numeric
    columns). A fixed-size list is [size] unless its field metadata declares `shape`; a
    list needs the declared shape."""
    if len(features) != 1:
        for name in features:
            if pa.types.is_list(schema.field(name).type) or pa.types.is_fixed_size_list(
                schema.field(name).type
            ):
                raise InvalidTensorColumn(
                    f"tensor column {name!r} must be the dataset's only feature column"
                )
        return None
    column = schema.field(features[0])
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)):
        return None
    if not pa.types.is_integer(kind.value_type) and not pa.types.is_floating(kind.value_type):
        raise InvalidTensorColumn(f"tensor column {column.name!r} holds {kind.value_type}")
    declared = (column.metadata or {}).get(b"shape")
    if declared is not None:
        try:
            shape = [int(d) for d in json.loads(declared)]
        except (ValueError, TypeError):
            raise InvalidTensorColumn(
                f"tensor column {column.name!r}: shape metadata {declared!r} is not a list "
                "of integers"
            ) from None
        if not shape or min(shape) < 1:
            raise InvalidTensorColumn(f"tensor column {column.name!r}: shape {shape}")
    elif pa.types.is_fixed_size_list(kind):
        shape = [kind.list_size]
    else:
        raise InvalidTensorColumn(
            f"tensor column {column.name!r} is a variable-size list: declare its shape in the "
            'field metadata (shape: "[1, 8, 8]") or store it as a fixed-size list'
        )
    if pa.types.is_fixed_size_list(kind) and math.prod(shape) != kind.list_size:
        raise InvalidTensorColumn(
            f"tensor column {column.name!r}: declared shape {shape} does not hold "
            f"{kind.list_size} values"
        )
    return shape


def tensor_rows(column: pa.Array, name: str, size: int, n: int) -> np.ndarray:
    """A list column's rows as [n, size] float32; rows of another length are refused."""
    if column.null_count:
        raise InvalidTensorColumn(f"tensor column {name!r} has null rows")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != size)
        if len(wrong):
            raise InvalidTensorColumn(
                f"tensor column {name!r}: rows have different lengths (row {int(wrong[0])} has "
                f"{int(lengths[wrong[0]])} values, the shape needs {size})"
            )
    values = column.flatten().to_numpy(zero_copy_only=False)
    if values.size != n * size:  # nulls inside rows, or a sliced array
        raise InvalidTensorColumn(f"tensor column {name!r} has null values inside rows")
    return values.reshape(n, size)
