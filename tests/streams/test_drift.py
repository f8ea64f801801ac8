"""Training baselines (streams/drift.py) for datasets announced without column statistics:
the statistics the validator computed and published in `dataset.validated` are the
baseline, so every validated dataset can be compared against."""

from __future__ import annotations

from typing import Any

from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import wrap
from mlbus.schemas.datasets import (
    ColumnSchema,
    ColumnStats,
    DatasetCreated,
    DatasetValidated,
    Histogram,
)
from mlbus.schemas.models import ModelPromoted
from mlbus.streams.drift import Baseline, Baselines

HASH = "sha256:" + "1" * 64


def stats() -> dict[str, ColumnStats]:
    """What the validator computes for 100 rows of x = 0..99 and a 0/1 label."""
    return {
        "x": ColumnStats(
            kind="numeric",
            null_count=0,
            min=0.0,
            max=99.0,
            mean=49.5,
            std=28.87,
            histogram=Histogram(edges=[0.0, 49.5, 99.0], counts=[50, 50]),
        ),
        "label": ColumnStats(
            kind="numeric",
            null_count=0,
            min=0.0,
            max=1.0,
            mean=0.5,
            std=0.5,
            histogram=Histogram(edges=[0.0, 0.5, 1.0], counts=[50, 50]),
        ),
    }


def created(**changes: Any) -> DatasetCreated:
    fields: dict[str, Any] = dict(
        name="orders",
        version="2026-11-21",
        uri="file:///lake/orders.parquet",
        content_hash=HASH,
        arrow_schema=[
            ColumnSchema(name="x", type="double"),
            ColumnSchema(name="label", type="int64"),
        ],
        num_rows=100,
        num_bytes=1000,
        label_column="label",
    )
    return DatasetCreated(**(fields | changes))


def validated(**changes: Any) -> DatasetValidated:
    fields: dict[str, Any] = dict(
        name="orders",
        version="2026-11-21",
        uri="file:///lake/orders.parquet",
        content_hash=HASH,
        num_rows=100,
        validator="validator",
        label_column="label",
    )
    return DatasetValidated(**(fields | changes))


def promoted() -> ModelPromoted:
    return ModelPromoted(
        model="churn",
        version="3",
        reason="test",
        actor="tests",
        dataset=DatasetRef(name="orders", version="2026-11-21"),
    )


def baselines(*payloads: Any) -> Baselines:
    found = Baselines()
    for payload in payloads:
        found.add(wrap(payload, source="tests"))
    return found


def test_an_upstream_dataset_without_statistics_has_no_baseline_until_validated() -> None:
    note = baselines(created(), promoted()).resolve("churn", "3")
    assert isinstance(note, str) and "no column histograms" in note


def test_the_statistics_of_dataset_validated_are_the_baseline() -> None:
    found = baselines(
        created(), validated(columns=stats(), stats_computed=True), promoted()
    ).resolve("churn", "3")
    assert isinstance(found, Baseline), found
    assert set(found.features) == {"x"} and found.label_column == "label"
    assert found.dataset == "orders@2026-11-21"


def test_the_order_of_the_events_does_not_matter() -> None:
    found = baselines(
        promoted(), validated(columns=stats(), stats_computed=True), created()
    ).resolve("churn", "3")
    assert isinstance(found, Baseline), found


def test_statistics_in_dataset_created_are_used_as_they_are() -> None:
    found = baselines(created(columns=stats()), promoted()).resolve("churn", "3")
    assert isinstance(found, Baseline) and set(found.features) == {"x"}
