"""The deterministic train/validation/test split of a dataset's rows. The trainer trains on
it and the workflow re-evaluates a champion on the candidate's test rows, so both must get
the same rows from the same (row count, seed, fractions); a recorded run's split can be
rebuilt from its `training.completed` alone. No topics here."""

from __future__ import annotations

import numpy as np

from mlbus.errors import Invalid


class InvalidSplit(Invalid):
    """Fractions that cannot split the rows (out of range, or nothing left to train on)."""


def split_indices(n: int, seed: int, validation: float, test: float) -> dict[str, np.ndarray]:
    """Row indices of each split ("test", "validation", "train"): disjoint, together every
    row of `range(n)`. One seeded permutation, test rows first, then validation, then train;
    changing that order or the rounding would change every existing run's split."""
    if not (0.0 <= validation < 1.0 and 0.0 <= test < 1.0):
        raise InvalidSplit(
            f"split fractions must be in [0, 1): validation {validation}, test {test}"
        )
    if validation + test >= 1.0:
        raise InvalidSplit("validation + test fractions must leave rows to train on")
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = round(n * test), round(n * validation)
    if n_test + n_val >= n:
        raise InvalidSplit(
            f"validation + test fractions must leave rows to train on ({n} rows: "
            f"{n_test} test, {n_val} validation)"
        )
    return {
        "test": order[:n_test],
        "validation": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
