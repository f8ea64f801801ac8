"""Standardisation of feature columns: fitted on the training rows by the trainer, stored in
the model card (`mean`, `std`), applied to the same columns by the model server on every
request and by the workflow when it re-evaluates a champion. One implementation, so a model
sees the same inputs in training, serving and evaluation. No topics here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _guarded(std: np.ndarray) -> np.ndarray:
    # A constant column (a blank pixel) has std 0: dividing by 1 keeps it at 0 after centring
    # instead of turning it into NaN. Cards written before the trainer applied this guard
    # may still carry a 0.
    std = std.copy()
    std[std == 0] = 1.0
    return std


@dataclass(frozen=True, eq=False)
class Standardisation:
    """Per-column `(x - mean) / std`, float32 (the dtype models are trained and served in)."""

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
        std = _guarded(np.asarray(self.std, dtype=np.float32).reshape(-1))
        if mean.shape != std.shape:
            raise ValueError(f"{mean.size} means for {std.size} standard deviations")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def fit(cls, train: np.ndarray) -> Standardisation:
        """Mean and (population) std of each column of the training rows [rows, columns]."""
        if train.ndim != 2 or len(train) == 0:
            raise ValueError(f"cannot fit a standardisation on an array of shape {train.shape}")
        return cls(train.mean(axis=0), train.std(axis=0))

    @classmethod
    def from_lists(cls, mean: Sequence[float], std: Sequence[float]) -> Standardisation:
        """From its serialised form (the model card's `mean` and `std`)."""
        return cls(np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32))

    def to_lists(self) -> tuple[list[float], list[float]]:
        """The serialised form: (mean, std) as plain floats, for the model card's JSON."""
        return [float(v) for v in self.mean], [float(v) for v in self.std]

    @property
    def n_features(self) -> int:
        return self.mean.size

    def apply(self, x: np.ndarray) -> np.ndarray:
        """`x` [rows, columns] standardised into a new C-contiguous float32 array; `x` itself
        is left as it is (serving logs the raw inputs). On the serving hot path (float32,
        C-ordered input) that is one allocation, divided in place."""
        if x.dtype != np.float32:
            x = x.astype(np.float32)  # the cast the model's input needs anyway
        out = x - self.mean
        np.divide(out, self.std, out=out)
        return np.ascontiguousarray(out)  # a no-op unless `x` was not C-ordered
