"""The shared standardisation: fitted on training rows, a constant column divides by 1
instead of 0, its serialised form gives back the same transform, and applying it leaves the
raw inputs untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlbus.ml.preprocessing import Standardisation


def test_fitted_columns_are_centred_and_scaled_and_a_constant_column_stays_zero():
    rng = np.random.default_rng(0)
    train = np.column_stack([rng.normal(5, 2, 500), np.full(500, 3.0)]).astype(np.float32)
    s = Standardisation.fit(train)
    assert s.std[1] == 1.0  # the constant column's std 0 became 1
    scaled = s.apply(train)
    assert np.isfinite(scaled).all() and scaled.dtype == np.float32
    assert scaled.flags.c_contiguous
    assert np.allclose(scaled.mean(axis=0), 0, atol=1e-5)
    assert np.isclose(scaled[:, 0].std(), 1, atol=1e-5) and (scaled[:, 1] == 0).all()


def test_the_serialised_form_round_trips_through_json_to_the_same_transform():
    train = np.random.default_rng(1).random((50, 3)).astype(np.float32) * 100
    s = Standardisation.fit(train)
    mean, std = json.loads(json.dumps(s.to_lists()))
    again = Standardisation.from_lists(mean, std)
    x = np.random.default_rng(2).random((4, 3)).astype(np.float32)
    assert np.array_equal(s.apply(x), again.apply(x))


def test_a_stored_zero_std_is_guarded_and_inputs_are_not_changed():
    s = Standardisation.from_lists([1.0, 2.0], [2.0, 0.0])
    x = np.asarray([[3.0, 5.0]], dtype=np.float64)
    before = x.copy()
    assert s.apply(x).tolist() == [[1.0, 3.0]]
    assert np.array_equal(x, before)


def test_a_mismatched_or_empty_fit_is_refused():
    with pytest.raises(ValueError, match="2 means for 3"):
        Standardisation.from_lists([0.0, 0.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        Standardisation.fit(np.empty((0, 3), dtype=np.float32))
