"""Column statistics (the drift baseline): exact for small data, compared with numpy; counts
that add up; deterministic; and every numeric column of real data handled."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from mlbus.datasets.stats import BINS, SAMPLE_SIZE, TOP, StatsBuilder
from mlbus.schemas.datasets import ColumnStats


def stats_of(table: pa.Table, batch_rows: int | None = None) -> dict[str, ColumnStats]:
    builder = StatsBuilder(table.schema)
    for batch in table.to_batches(batch_rows):
        builder.add(batch)
    return builder.result()


def with_nulls(values: np.ndarray, every: int) -> pa.Array:
    mask = np.zeros(len(values), dtype=bool)
    mask[::every] = True
    return pa.array(values, mask=mask)


def test_numeric_statistics_are_exact_for_small_data() -> None:
    rng = np.random.default_rng(7)
    floats = rng.normal(10.0, 3.0, size=5000)
    ints = rng.integers(-50, 50, size=5000)
    table = pa.table({"f": with_nulls(floats, 7), "i": with_nulls(ints, 11)})

    # Many small batches, so the per-batch merge is exercised too.
    result = stats_of(table, batch_rows=333)
    for name, raw, every in (("f", floats, 7), ("i", ints, 11)):
        present = np.delete(raw, np.arange(0, len(raw), every)).astype(np.float64)
        s = result[name]
        assert s.kind == "numeric"
        assert s.null_count == len(raw) - len(present)
        assert s.min == present.min() and s.max == present.max()
        assert s.mean == pytest.approx(present.mean(), rel=1e-12)
        assert s.std == pytest.approx(present.std(), rel=1e-10)
        assert s.histogram is not None
        counts, edges = np.histogram(present, bins=BINS, range=(present.min(), present.max()))
        assert s.histogram.counts == counts.tolist()
        assert s.histogram.edges == pytest.approx(edges.tolist())
        assert sum(s.histogram.counts) == len(present)


def test_histogram_counts_add_up_to_the_count_when_sampled() -> None:
    values = np.random.default_rng(1).exponential(2.0, size=SAMPLE_SIZE * 2 + 12_345)
    table = pa.table({"x": with_nulls(values, 1000)})
    s = stats_of(table, batch_rows=65_536)["x"]
    present = len(values) - s.null_count
    assert s.null_count == len(range(0, len(values), 1000))
    assert s.histogram is not None and len(s.histogram.counts) == BINS
    assert sum(s.histogram.counts) == present
    # Estimated from a uniform sample, the shape is right to within a few percent.
    kept = np.delete(values, np.arange(0, len(values), 1000))
    exact, _ = np.histogram(kept, bins=BINS, range=(s.min, s.max))
    assert np.abs(np.array(s.histogram.counts) - exact).max() < 0.02 * present
    # min, max and mean stay exact.
    assert (s.min, s.max) == (kept.min(), kept.max())
    assert s.mean == pytest.approx(kept.mean(), rel=1e-12)


def test_statistics_are_deterministic() -> None:
    table = pa.table({"x": np.random.default_rng(3).random(SAMPLE_SIZE * 3)})
    assert stats_of(table, 100_000) == stats_of(table, 100_000)


def test_a_constant_column_has_one_bin() -> None:
    s = stats_of(pa.table({"x": np.full(10, 4.0)}))["x"]
    assert (s.min, s.max, s.mean, s.std) == (4.0, 4.0, 4.0, 0.0)
    assert s.histogram is not None and s.histogram.counts == [10]


def test_an_all_null_numeric_column_has_only_its_null_count() -> None:
    s = stats_of(pa.table({"x": pa.array([None, None, None], type=pa.float64())}))["x"]
    assert s.kind == "numeric" and s.null_count == 3
    assert s.min is None and s.mean is None and s.histogram is None


def test_categorical_columns_get_distinct_counts_and_top_values() -> None:
    words = ["b"] * 5 + ["a"] * 5 + ["c"] * 3 + [None] * 2 + [f"rare{i}" for i in range(12)]
    table = pa.table({"w": pa.array(words), "flag": pa.array([True, False, True] * 9)})
    result = stats_of(table, batch_rows=4)

    w = result["w"]
    expected = Counter(x for x in words if x is not None)
    assert w.kind == "categorical" and w.null_count == 2
    assert w.distinct_count == len(expected)
    assert w.top_values is not None and len(w.top_values) == TOP
    # Most frequent first; ties by value, so the order is deterministic.
    assert [(v.value, v.count) for v in w.top_values[:3]] == [("a", 5), ("b", 5), ("c", 3)]
    assert all(v.count == 1 for v in w.top_values[3:])

    flag = result["flag"]
    assert flag.kind == "categorical"
    assert {(v.value, v.count) for v in flag.top_values or []} == {("True", 18), ("False", 9)}


def test_dictionary_encoded_columns_count_their_values() -> None:
    column = pa.array(["x", "y", "x", None, "x"]).dictionary_encode()
    s = stats_of(pa.table({"d": column}))["d"]
    assert s.kind == "categorical" and s.null_count == 1
    assert [(v.value, v.count) for v in s.top_values or []] == [("x", 3), ("y", 1)]


def test_other_types_get_their_null_count() -> None:
    column = pa.array([1, None, 3], type=pa.timestamp("s"))
    s = stats_of(pa.table({"t": column}))["t"]
    assert s.kind == "other" and s.null_count == 1


@pytest.mark.parametrize(
    "values, arrow_type",
    [
        # nanoseconds since the epoch, as int64: beyond 2**53, not exactly a double
        ([1_763_700_000_123_456_789, 1_763_700_001_987_654_321], pa.int64()),
        ([2**64 - 1, 2**63], pa.uint64()),  # 64-bit hashes
    ],
)
def test_large_integers_get_statistics(values: list[int], arrow_type: pa.DataType) -> None:
    """Integers that a double cannot hold exactly still have a min, max and mean (to a
    double's precision); they must not make the data impossible to register."""
    s = stats_of(pa.table({"n": pa.array(values, type=arrow_type)}))["n"]
    assert s.min == pytest.approx(float(min(values)))
    assert s.max == pytest.approx(float(max(values)))
    assert s.mean == pytest.approx(sum(values) / len(values))
