"""From Arrow record batches to torch tensors, with no pandas detour: features are copied
once into a preallocated float32 matrix, rows are split deterministically by seed
(`mlbus.ml.split`), and features are standardised with the training split's mean and std
(`mlbus.ml.preprocessing`; kept for the model card, so serving applies the same
preprocessing)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mlbus.errors import Invalid
from mlbus.ml.preprocessing import Standardisation
from mlbus.ml.split import InvalidSplit, split_indices


class InvalidTrainingRequest(Invalid):
    """A request that can never succeed on its data (nulls, one class, bad split): not
    retryable."""


@dataclass
class Prepared:
    features: list[str]
    label: str
    classes: list[str]
    standardisation: Standardisation  # fitted on the train split
    x: dict[str, torch.Tensor]  # split name → features
    y: dict[str, torch.Tensor]  # split name → class indices


def load_arrays(
    batches: Iterable[pa.RecordBatch], *, num_rows: int, features: Sequence[str], label: str
) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [rows, features], raw labels) from batches holding those columns."""
    x = np.empty((num_rows, len(features)), dtype=np.float32)
    labels: list[np.ndarray] = []
    row = 0
    for batch in batches:
        n = batch.num_rows
        for j, name in enumerate(features):
            column = batch.column(name)
            if column.null_count:
                raise InvalidTrainingRequest(f"feature column {name!r} has null values")
            x[row : row + n, j] = column.to_numpy(zero_copy_only=False)
        labels.append(batch.column(label).to_numpy(zero_copy_only=False))
        row += n
    if row != num_rows:
        raise InvalidTrainingRequest(f"expected {num_rows} rows, read {row}")
    if not np.isfinite(x).all():
        raise InvalidTrainingRequest("features contain NaN or infinite values")
    return x, np.concatenate(labels) if labels else np.empty(0)


def prepare(
    x: np.ndarray,
    raw_labels: np.ndarray,
    *,
    features: Sequence[str],
    label: str,
    seed: int,
    validation: float,
    test: float,
) -> Prepared:
    classes, y = np.unique(raw_labels, return_inverse=True)
    if len(classes) < 2:
        raise InvalidTrainingRequest(f"label column {label!r} has fewer than two classes")
    try:
        parts = split_indices(len(x), seed, validation, test)
    except InvalidSplit as e:
        raise InvalidTrainingRequest(str(e)) from None
    standardisation = Standardisation.fit(x[parts["train"]])
    scaled = standardisation.apply(x)
    return Prepared(
        features=list(features),
        label=label,
        classes=[str(c) for c in classes],
        standardisation=standardisation,
        x={k: torch.from_numpy(np.ascontiguousarray(scaled[i])) for k, i in parts.items()},
        y={k: torch.from_numpy(y[i].astype(np.int64)) for k, i in parts.items()},
    )
