"""Input tensors: the flat `data` list (or nested rows) becomes float32 [rows, features],
and every refusal names why, in the same order of checks whatever the fast path skips."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from mlbus.ml.card import ModelCard
from mlbus.serving.errors import InvalidInput
from mlbus.serving.registry import Deployment
from mlbus.serving.tensors import float64, to_array


def _deployment(features: int = 3) -> Deployment:
    card = ModelCard(
        family="mlp",
        hyperparameters={},
        label="c",
        features=[f"f{i}" for i in range(features)],
        classes=["a", "b"],
        mean=[0.0] * features,
        std=[1.0] * features,
    )
    return Deployment("m", "1", "sha256:" + "0" * 64, nn.Linear(features, 2).eval(), card)


def test_flat_and_nested_data_give_the_same_rows():
    d = _deployment()
    flat = to_array(d, "input", [2, 3], "FP32", [0.5, 1, 2.25, -3, 4, True])
    nested = to_array(d, "input", [2, 3], "FP64", [[0.5, 1, 2.25], [-3, 4, True]])
    assert flat.dtype == np.float32 and flat.shape == (2, 3)
    assert np.array_equal(flat, [[0.5, 1, 2.25], [-3, 4, 1]])
    assert np.array_equal(nested, flat)
    assert np.array_equal(to_array(d, "input", [1, 3], "INT64", [1, 2, 3]), [[1, 2, 3]])


@pytest.mark.parametrize(
    ("datatype", "data", "fragment"),
    [
        ("FP32", ["a", 1, 2], "only numbers"),
        ("FP32", [10**400, 1, 2], "only numbers"),  # no float holds it (was a 500)
        ("FP32", [[1, 2], [3]], "only numbers"),  # ragged rows
        ("FP32", [1, 2], "needs 3"),
        ("FP32", [float("nan"), 1, 2], "NaN or infinite"),
        ("FP64", [float("inf"), 1, 2], "NaN or infinite"),
        ("FP64", [1e39, 1, 2], "FP32 range"),
        ("INT8", [300, 1, 2], "INT8"),
        ("INT8", [1.5, 1, 2], "INT8"),
        ("INT8", [float("nan"), 1, 2], "NaN or infinite"),  # before the datatype's range
        ("UINT64", [1e39, 1, 2], "UINT64"),  # the datatype's range before FP32's
    ],
)
def test_refusals_say_why(datatype, data, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        to_array(_deployment(), "input", [1, 3], datatype, data)


def test_float64_packs_numbers_and_refuses_the_rest():
    assert np.array_equal(float64([1, 2.5, False], "no"), [1.0, 2.5, 0.0])
    assert np.array_equal(float64([[1, 2], [3, 4]], "no"), [1, 2, 3, 4])
    assert float64([], "no").size == 0
    for bad in (["x"], [{"a": 1}], [[1], [2, 3]]):
        with pytest.raises(InvalidInput, match=r"^no$"):
            float64(bad, "no")
