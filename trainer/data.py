"""From Arrow record batches to torch tensors, with no pandas detour: features are copied
once into a preallocated float32 matrix, rows are split deterministically by seed, and
features are standardised with the training split's mean and std (kept for the model card,
so serving applies the same preprocessing)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mlbus.errors import Invalid


class InvalidTrainingRequest(Invalid):
    """A request that can never succeed on its data (nulls, one class, bad split): not
    retryable."""


@dataclass
class Prepared:
    features: list[str]
    label: str
    classes: list[str]
    mean: list[float]
    std: list[float]
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


def split_indices(n: int, seed: int, validation: float, test: float) -> dict[str, np.ndarray]:
    """Deterministic train/validation/test row indices."""
    if validation + test >= 1.0:
        raise InvalidTrainingRequest("validation + test fractions must leave rows to train on")
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test), round(n * validation)
    return {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }


def prepare(
    x: np.ndarray, raw_labels: np.ndarray, *, features: Sequence[str], label: str,
    seed: int, validation: float, test: float,
) -> Prepared:  # fmt: skip
    classes, y = np.unique(raw_labels, return_inverse=True)
    if len(classes) < 2:
        raise InvalidTrainingRequest(f"label column {label!r} has fewer than two classes")
    parts = split_indices(len(x), seed, validation, test)
    train = x[parts["train"]]
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0  # constant columns (blank pixels) stay 0 after centring
    scaled = (x - mean) / std
    return Prepared(
        features=list(features),
        label=label,
        classes=[str(c) for c in classes],
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        x={k: torch.from_numpy(np.ascontiguousarray(scaled[i])) for k, i in parts.items()},
        y={k: torch.from_numpy(y[i].astype(np.int64)) for k, i in parts.items()},
    )
