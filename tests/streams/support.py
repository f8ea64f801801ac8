"""A known serving history for the stream processor tests: a training baseline on the log
(dataset.created → training.completed → model.promoted), and inference.logged records with
known latencies, errors, classes and inputs, one version's inputs shifted for a while, and
the exact figures every window must report."""

from __future__ import annotations

import bisect
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlbus.schemas.base import DatasetRef
from mlbus.schemas.codec import STRUCTURED_HEADERS, encode_new
from mlbus.schemas.datasets import ColumnSchema, ColumnStats, DatasetCreated, Histogram, ValueCount
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.serving import InferenceLogged
from mlbus.schemas.training import Artifact, CodeVersion, TrainingCompleted

SHA = "sha256:" + "cd" * 32
FEATURES = ("f0", "f1")
EDGES = [float(i) for i in range(11)]  # 10 bins on [0, 10]
COUNTS = [10, 40, 90, 160, 200, 200, 160, 90, 40, 10]
CLASSES = ("0", "1", "2")
CLASS_P = (0.5, 0.3, 0.2)
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: event times are ours, not the clock's


def dataset() -> DatasetCreated:
    hist = ColumnStats(
        kind="numeric",
        null_count=0,
        min=0.0,
        max=10.0,
        histogram=Histogram(edges=EDGES, counts=COUNTS),
    )
    label = ColumnStats(
        kind="categorical",
        null_count=0,
        top_values=[
            ValueCount(value=c, count=round(p * 1000))
            for c, p in zip(CLASSES, CLASS_P, strict=True)
        ],
    )
    return DatasetCreated(
        name="shapes",
        version="ds1",
        uri="file:///tmp/shapes.parquet",
        content_hash=SHA,
        arrow_schema=[ColumnSchema(name=n, type="double") for n in FEATURES]
        + [ColumnSchema(name="label", type="string")],
        num_rows=1000,
        num_bytes=10_000,
        columns={"f0": hist, "f1": hist, "label": label},
        label_column="label",
    )


def completed(version: str, run_id: str) -> TrainingCompleted:
    return TrainingCompleted(
        run_id=run_id,
        model="clf",
        version=version,
        request_id=f"req-{run_id}",
        family="mlp",
        dataset=DatasetRef(name="shapes", version="ds1"),
        artifact=Artifact(uri=f"file:///tmp/{run_id}.pt", sha256=SHA, size_bytes=1),
        metrics={"test": {"accuracy": 0.9}},
        epochs=1,
        code=CodeVersion(package_version="0.1"),
        duration_seconds=1.0,
    )


def promoted(version: str, run_id: str, with_dataset: bool) -> ModelPromoted:
    return ModelPromoted(
        model="clf",
        version=version,
        run_id=run_id,
        reason="test",
        actor="tests",
        dataset=DatasetRef(name="shapes", version="ds1") if with_dataset else None,
    )


def baseline_events() -> list:
    """clf v1 is promoted with a run id only (resolved through training.completed), clf v2
    with its dataset; model `plain` has no baseline at all."""
    return [
        dataset(),
        completed("v1", "r1"),
        completed("v2", "r2"),
        promoted("v1", "r1", False),
        promoted("v2", "r2", True),
    ]


@dataclass
class Expected:
    """Exact per tumbling window figures: (model, version, window start ms) → ..."""

    requests: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[tuple[str, str, int], int] = field(default_factory=lambda: defaultdict(int))
    latencies: dict[tuple[str, str, int], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    classes: dict[tuple[str, str, int], dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )
    late: int = 0
    shifted_windows: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class History:
    payloads: list[tuple[InferenceLogged, int]]  # in production order, with event time ms
    expected: Expected
    window_ms: int
    windows: int


def _sample(rng: random.Random) -> float:
    i = rng.choices(range(len(COUNTS)), weights=COUNTS)[0]
    return EDGES[i] + rng.random() * (EDGES[i + 1] - EDGES[i])


def history(
    total: int = 10_000,
    windows: int = 20,
    window_ms: int = 1000,
    shift: range = range(6, 13),
    seed: int = 7,
) -> History:
    """`total` records over `windows` tumbling windows: clf v1 (normal), clf v2 (inputs
    shifted by +3 in the `shift` windows), plain v1 (no baseline); 1 % errors on clf v1, 20 %
    on plain v1; plus one record older than every open window (late), after window 12."""
    rng = random.Random(seed)
    expected = Expected(shifted_windows=set(shift))
    per_window = total // windows
    mix = (("clf", "v1", 0.5), ("clf", "v2", 0.3), ("plain", "v1", 0.2))
    out: list[tuple[InferenceLogged, int]] = []
    n = 0
    for w in range(windows):
        start = BASE_MS + w * window_ms
        for i in range(per_window):
            model, version = rng.choices([(m, v) for m, v, _ in mix], [p for *_, p in mix])[0]
            t = start + (i * window_ms) // per_window
            n += 1
            shifted = version == "v2" and w in shift
            latency = round(math.exp(rng.gauss(math.log(0.05), 0.6)), 6)
            failing = (model == "plain" and n % 5 == 0) or (version == "v1" and n % 100 == 0)
            inputs = [
                [_sample(rng) + (3.0 if shifted else 0.0) for _ in FEATURES] for _ in range(2)
            ]
            predictions = rng.choices(CLASSES, CLASS_P, k=2)
            payload = InferenceLogged(
                request_id=f"r{n}",
                model=model,
                version=version,
                replica="rep-1",
                latency_seconds=latency,
                ok=not failing,
                error="boom" if failing else None,
                batch_size=2,
                predictions=predictions,
                feature_names=list(FEATURES),
                inputs=inputs,
            )
            out.append((payload, t))
            key = (model, version, start)
            expected.requests[key] += 1
            expected.errors[key] += failing
            expected.latencies[key].append(latency)
            for p in predictions:
                expected.classes[key][p] += 1
        if w == 12:  # one record for window 2, long closed by now: late
            late = InferenceLogged(
                request_id="late-1",
                model="clf",
                version="v1",
                replica="rep-1",
                latency_seconds=0.01,
                predictions=["0"],
                feature_names=list(FEATURES),
                inputs=[[5.0, 5.0]],
            )
            out.append((late, BASE_MS + 2 * window_ms + 10))
            expected.late += 1
    return History(out, expected, window_ms, windows)


def encoded(history: History) -> list[tuple[str, bytes]]:
    """(key, value) records as the model server would publish them."""
    out = []
    for payload, t in history.payloads:
        ref, value = encode_new(
            payload, source="mlbus/serving", time=datetime.fromtimestamp(t / 1000, UTC)
        )
        out.append((ref.key or payload.model, value))
    return out


def lower_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


def bin_counts(values: list[float]) -> list[int]:
    counts = [0] * (len(EDGES) - 1)
    for x in values:
        counts[min(max(bisect.bisect_right(EDGES, x) - 1, 0), len(counts) - 1)] += 1
    return counts


HEADERS = STRUCTURED_HEADERS
