"""The shared split: deterministic by seed, disjoint, covering every row, and the same rows
the trainer has always taken (so existing runs' test sets keep their meaning)."""

from __future__ import annotations

import numpy as np
import pytest

from mlbus.ml.split import InvalidSplit, split_indices


def test_the_same_seed_gives_the_same_split_and_another_seed_another():
    a, b = split_indices(1000, 3, 0.2, 0.1), split_indices(1000, 3, 0.2, 0.1)
    assert all(np.array_equal(a[k], b[k]) for k in ("train", "validation", "test"))
    other = split_indices(1000, 4, 0.2, 0.1)
    assert not np.array_equal(a["test"], other["test"])


@pytest.mark.parametrize(
    ("n", "validation", "test"), [(1000, 0.2, 0.1), (7, 0.15, 0.15), (150, 0.0, 0.3), (10, 0, 0)]
)
def test_the_splits_are_disjoint_and_cover_every_row(n, validation, test):
    parts = split_indices(n, 0, validation, test)
    rows = np.concatenate([parts["train"], parts["validation"], parts["test"]])
    assert len(rows) == n and set(rows.tolist()) == set(range(n))
    assert len(parts["test"]) == round(n * test)
    assert len(parts["validation"]) == round(n * validation)


def test_the_rows_are_the_ones_existing_runs_were_trained_on():
    # Pinned: models, lineage and the workflow's re-evaluation depend on these exact rows.
    parts = split_indices(10, 0, 0.2, 0.2)
    assert parts["test"].tolist() == [4, 6]
    assert parts["validation"].tolist() == [2, 7]
    assert parts["train"].tolist() == [3, 5, 9, 0, 8, 1]
    parts = split_indices(12, 42, 0.15, 0.15)
    assert parts["test"].tolist() == [0, 7] and parts["validation"].tolist() == [6, 9]


@pytest.mark.parametrize(("n", "validation", "test", "problem"), [
    (100, 0.5, 0.5, "leave rows to train on"),
    (100, -0.1, 0.2, r"must be in \[0, 1\)"),
    (2, 0.4, 0.4, "leave rows to train on"),  # fractions below 1, but no row left after rounding
])  # fmt: skip
def test_a_split_that_leaves_nothing_to_train_on_is_refused(n, validation, test, problem):
    with pytest.raises(InvalidSplit, match=problem):
        split_indices(n, 0, validation, test)
