"""From Arrow record batches to torch tensors, with no pandas detour: features are copied
once into a preallocated float32 matrix, rows are split deterministically by seed
(`mlbus.ml.split`), and features are standardised with the training split's mean and std
(`mlbus.ml.preprocessing`; kept for the model card, so serving applies the same
preprocessing).

Inputs are numeric columns, or one tensor column: an Arrow fixed-size list, or a list whose
shape is declared in the column's field metadata (`shape`: "[1, 8, 8]"), so an image dataset
is [N, C, H, W]. A tensor is standardised by one mean and std over all its values. Targets
are class labels (classification) or numbers (regression: standardised for training, the
scaling kept for the card)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from mlbus.ml.preprocessing import Standardisation
from mlbus.ml.split import InvalidSplit, split_indices
from mlbus.ml.tensors import tensor_rows
from mlbus.trainer.errors import InvalidTrainingRequest


@dataclass
class Prepared:
    features: list[str]
    label: str
    classes: list[str]
    standardisation: Standardisation  # fitted on the train split
    x: dict[str, torch.Tensor]  # split name → features [rows, *feed shape]
    y: dict[str, torch.Tensor]  # split name → class indices, or scaled targets [rows, 1]
    task: str = "classification"
    input_shape: list[int] = field(default_factory=list)  # one sample's shape
    target_mean: float = 0.0  # regression: y = (target - mean) / std
    target_std: float = 1.0


def load_arrays(
    batches: Iterable[pa.RecordBatch],
    *,
    num_rows: int,
    features: Sequence[str],
    label: str,
    shape: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(X float32 [rows, features], raw labels) from batches holding those columns; with
    `shape`, the one feature is a tensor column and X is [rows, prod(shape)]."""
    width = math.prod(shape) if shape else len(features)
    x = np.empty((num_rows, width), dtype=np.float32)
    labels: list[np.ndarray] = []
    row = 0
    for batch in batches:
        n = batch.num_rows
        if row + n > num_rows:
            raise InvalidTrainingRequest(f"expected {num_rows} rows, read more")
        if shape:
            x[row : row + n] = tensor_rows(batch.column(features[0]), features[0], width, n)
            labels.append(batch.column(label).to_numpy(zero_copy_only=False))
            row += n
            continue
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
    task: str = "classification",
    input_shape: Sequence[int] | None = None,
    feed_shape: Sequence[int] | None = None,
) -> Prepared:
    """Split, standardise and shape: X as [rows, *feed_shape] (default: flat rows), y as
    class indices or, for regression, standardised targets [rows, 1]."""
    try:
        parts = split_indices(len(x), seed, validation, test)
    except InvalidSplit as e:
        raise InvalidTrainingRequest(str(e)) from None
    target_mean, target_std = 0.0, 1.0
    if task == "regression":
        if raw_labels.dtype.kind not in "iuf":
            raise InvalidTrainingRequest(
                f"regression target {label!r} is not numeric ({raw_labels.dtype.name} values "
                f"such as {raw_labels[:1].tolist()})"
            )
        target = raw_labels.astype(np.float64)
        if not np.isfinite(target).all():
            raise InvalidTrainingRequest(f"regression target {label!r} has NaN or infinite values")
        train = target[parts["train"]]
        target_mean, target_std = float(train.mean()), float(train.std()) or 1.0
        scaled_y = ((target - target_mean) / target_std).astype(np.float32).reshape(-1, 1)
        classes: list[str] = []
        ys = {k: torch.from_numpy(np.ascontiguousarray(scaled_y[i])) for k, i in parts.items()}
    else:
        found, y = np.unique(raw_labels, return_inverse=True)
        if len(found) < 2:
            raise InvalidTrainingRequest(f"label column {label!r} has fewer than two classes")
        classes = [str(c) for c in found]
        ys = {k: torch.from_numpy(y[i].astype(np.int64)) for k, i in parts.items()}
    # A tensor is standardised as a whole (one mean and std), columns one by one.
    train = x[parts["train"]]
    standardisation = Standardisation.fit(train.reshape(-1, 1) if input_shape else train)
    scaled = standardisation.apply(x)
    if feed_shape is not None:
        scaled = scaled.reshape(len(x), *feed_shape)
    return Prepared(
        features=list(features),
        label=label,
        classes=classes,
        standardisation=standardisation,
        x={k: torch.from_numpy(np.ascontiguousarray(scaled[i])) for k, i in parts.items()},
        y=ys,
        task=task,
        input_shape=list(input_shape) if input_shape is not None else [len(features)],
        target_mean=target_mean,
        target_std=target_std,
    )
