"""Per-column statistics, computed in one streaming pass over record batches.

They are the training baseline that drift detection compares serving inputs against, so
they are deterministic: the same data gives the same figures. min, max, mean, std and null
counts are exact. Histograms (numeric) are exact over the data's [min, max] when the column
has at most 2 * SAMPLE_SIZE values, and otherwise estimated from a systematic sample (every
k-th value, SAMPLE_SIZE to 2 * SAMPLE_SIZE of them), scaled to the column's count.
Categorical columns get their distinct count and top values, exactly up to MAX_DISTINCT
distinct values.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlbus.schemas.datasets import ColumnStats, Histogram, ValueCount

BINS = 20
SAMPLE_SIZE = 65_536
MAX_DISTINCT = 100_000
TOP = 10


def _kind(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "numeric"
    if (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_dictionary(dtype)
    ):
        return "categorical"
    return "other"


class _Numeric:
    def __init__(self, seed: int) -> None:
        self.count = 0
        self.nulls = 0
        self.total = 0.0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        # Systematic sample: every `step`-th finite value. When it grows past twice its
        # size, every other value is dropped and the step doubles: deterministic, no random
        # numbers, memory bounded by 2 * SAMPLE_SIZE values.
        self.step = 1
        self.seen = 0
        self.parts: list[np.ndarray] = []
        self.kept = 0

    def add(self, column: pa.Array) -> None:
        self.nulls += column.null_count
        values = column.drop_null() if column.null_count else column
        if len(values) == 0:
            return
        # Statistics in float64: integers beyond 2**53 lose precision here, nothing else.
        data = np.asarray(values.cast(pa.float64(), safe=False), dtype=np.float64)
        ok = np.isfinite(data)
        finite = data if ok.all() else data[ok]
        n = len(finite)
        if n == 0:
            return
        # Chan et al.: merge this batch's mean and M2 into the running ones (exact, stable).
        batch_mean = float(finite.mean())
        batch_m2 = float(finite.var()) * n
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, float(finite.min()))
        self.max = max(self.max, float(finite.max()))
        offset = (-self.seen) % self.step  # continue the global stride across batches
        self.seen += n
        part = finite[offset :: self.step].copy()  # a copy: no batch is kept alive
        self.parts.append(part)
        self.kept += len(part)
        if self.kept > 2 * SAMPLE_SIZE:
            # The sample holds global indices 0, step, 2*step, ...: keeping every other one
            # leaves exactly the indices of the doubled step.
            self.parts = [np.concatenate(self.parts)[::2].copy()]
            self.kept = len(self.parts[0])
            self.step *= 2

    def _sample(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0)

    def result(self) -> ColumnStats:
        if self.count == 0:
            return ColumnStats(kind="numeric", null_count=self.nulls)
        std = math.sqrt(self.m2 / self.count)
        low, high = self.min, self.max
        if low == high:
            edges = np.array([low, high])
            counts = np.array([self.count])
        else:
            sample = self._sample()
            counts, edges = np.histogram(sample, bins=BINS, range=(low, high))
            if len(sample) < self.count:
                counts = _scale(counts, self.count)
        return ColumnStats(
            kind="numeric",
            null_count=self.nulls,
            min=low,
            max=high,
            mean=self.mean,
            std=std,
            histogram=Histogram(edges=[float(e) for e in edges], counts=[int(c) for c in counts]),
        )


def _scale(counts: np.ndarray, total: int) -> np.ndarray:
    """Scale sample counts to `total` with largest remainders, so they sum exactly."""
    exact = counts * (total / counts.sum())
    scaled = np.floor(exact).astype(np.int64)
    short = total - int(scaled.sum())
    if short:
        scaled[np.argsort(-(exact - scaled), kind="stable")[:short]] += 1
    return scaled


class _Categorical:
    def __init__(self) -> None:
        self.nulls = 0
        self.counts: Counter[str] = Counter()
        self.overflow = False

    def add(self, column: pa.Array) -> None:
        self.nulls += column.null_count
        if self.overflow:
            return
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        for item in pc.value_counts(column.drop_null()).to_pylist():
            self.counts[str(item["values"])] += item["counts"]
        if len(self.counts) > MAX_DISTINCT:
            self.overflow = True

    def result(self) -> ColumnStats:
        top = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP]
        return ColumnStats(
            kind="categorical",
            null_count=self.nulls,
            distinct_count=None if self.overflow else len(self.counts),
            top_values=[ValueCount(value=v, count=c) for v, c in top],
        )


class _Other:
    def __init__(self) -> None:
        self.nulls = 0

    def add(self, column: pa.Array) -> None:
        self.nulls += column.null_count

    def result(self) -> ColumnStats:
        return ColumnStats(kind="other", null_count=self.nulls)


class StatsBuilder:
    """Feed record batches of one schema with `add`; `result()` gives stats per column."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._columns: dict[str, _Numeric | _Categorical | _Other] = {}
        for i, field in enumerate(schema):
            kind = _kind(field.type)
            self._columns[field.name] = (
                _Numeric(seed=i)
                if kind == "numeric"
                else _Categorical()
                if kind == "categorical"
                else _Other()
            )

    def add(self, batch: pa.RecordBatch) -> None:
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            self._columns[name].add(column)

    def result(self) -> dict[str, ColumnStats]:
        return {name: builder.result() for name, builder in self._columns.items()}
