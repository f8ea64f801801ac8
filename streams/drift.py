"""Training baselines for drift: which dataset a served (model, version) was trained on, found
from the log (`model.promoted` → `training.completed` → `dataset.created`), its per-column
histograms and label distribution, and the Population Stability Index against them. An
upstream `dataset.created` without statistics gets them from its `dataset.validated` (the
validator computes them from the bytes).

Reads model.promoted, training.completed, dataset.created and dataset.validated (group-less,
followed for new events by a log view, `baseline_view`); writes nothing.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.logview import LogView
from mlbus.schemas.datasets import DatasetCreated, DatasetValidated
from mlbus.schemas.envelope import Event
from mlbus.schemas.models import ModelPromoted
from mlbus.schemas.training import TrainingCompleted
from mlbus.stats import EPSILON, psi

__all__ = ["CLASS_KEY", "EPSILON", "Baseline", "Baselines", "baseline_view", "class_psi", "psi"]

log = logging.getLogger(__name__)

FOLLOWED = ("dataset.created", "dataset.validated", "training.completed", "model.promoted")
#: `psi` key of the predicted-class distribution against the training label distribution.
CLASS_KEY = "predicted_class"


@dataclass(frozen=True)
class FeatureBaseline:
    edges: tuple[float, ...]
    expected: tuple[float, ...]  # probability per bin, from the training histogram

    def bin_of(self, value: float) -> int:
        """Bin of a served value; values outside the training range go to the outer bins
        (that is where a shifted distribution shows up)."""
        i = bisect.bisect_right(self.edges, value) - 1
        return min(max(i, 0), len(self.expected) - 1)


@dataclass(frozen=True)
class Baseline:
    """What a served version is compared with. `features` in the order inputs carry them."""

    dataset: str
    features: dict[str, FeatureBaseline]
    positional: tuple[str, ...]  # feature columns in dataset order, for inputs without names
    label_column: str | None
    labels: FeatureBaseline | None  # numeric label histogram
    label_values: dict[str, float] | None  # categorical label distribution


def class_psi(baseline: Baseline, classes: Mapping[str, int]) -> float | None:
    """PSI of the predicted classes against the training label distribution."""
    if not classes:
        return None
    if baseline.label_values is not None:
        names = sorted(set(baseline.label_values) | set(classes))
        expected = [baseline.label_values.get(n, 0.0) for n in names]
        return psi(expected, [classes.get(n, 0) for n in names])
    if baseline.labels is not None:
        counts = [0] * len(baseline.labels.expected)
        for name, count in classes.items():
            try:
                counts[baseline.labels.bin_of(float(name))] += count
            except ValueError:  # a non-numeric class against a numeric label column
                return None
        return psi(baseline.labels.expected, counts)
    return None


def _histogram_baseline(stats: object) -> FeatureBaseline | None:
    histogram = getattr(stats, "histogram", None)
    if (
        histogram is None
        or not histogram.counts
        or len(histogram.edges) != len(histogram.counts) + 1
    ):
        return None
    total = sum(histogram.counts)
    if total == 0:
        return None
    return FeatureBaseline(tuple(histogram.edges), tuple(c / total for c in histogram.counts))


def baseline_of(dataset: DatasetCreated) -> Baseline:
    features = {}
    for name, stats in dataset.columns.items():
        if name == dataset.label_column:
            continue
        found = _histogram_baseline(stats)
        if found is not None:
            features[name] = found
    positional = tuple(c.name for c in dataset.arrow_schema if c.name != dataset.label_column)
    labels = label_values = None
    if dataset.label_column and dataset.label_column in dataset.columns:
        stats = dataset.columns[dataset.label_column]
        if stats.kind == "categorical" and stats.top_values:
            total = sum(v.count for v in stats.top_values) or 1
            label_values = {v.value: v.count / total for v in stats.top_values}
        else:
            labels = _histogram_baseline(stats)
    return Baseline(
        dataset=f"{dataset.name}@{dataset.version}",
        features=features,
        positional=positional,
        label_column=dataset.label_column,
        labels=labels,
        label_values=label_values,
    )


class Baselines:
    """The lineage facts drift needs, kept from the log; thread-safe (a follower thread
    writes, the stream reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._datasets: dict[tuple[str, str], DatasetCreated] = {}
        self._validated: dict[tuple[str, str], DatasetValidated] = {}
        self._runs: dict[str, TrainingCompleted] = {}
        self._trained: dict[tuple[str, str], TrainingCompleted] = {}
        self._promoted: dict[tuple[str, str], ModelPromoted] = {}
        self._cache: dict[tuple[str, str], Baseline | str] = {}
        # Each model's last two promoted versions: what a model server keeps loaded (current
        # and previous); the other versions are retired.
        self._served: dict[str, list[str]] = {}
        self.on_promoted: Callable[[str], None] | None = None
        """called with the model's name after each promotion (the exporter's sweep)"""

    def add(self, event: Event) -> None:
        data = event.data
        self._add(data)
        if isinstance(data, ModelPromoted) and self.on_promoted is not None:
            self.on_promoted(data.model)

    def retired(self, model: str, version: str) -> bool:
        """Whether `version` is neither of its model's last two promotions (a model with no
        promotion in the log retires nothing)."""
        served = self._served.get(model)
        return served is not None and version not in served

    def _add(self, data: object) -> None:
        with self._lock:
            if isinstance(data, DatasetCreated):
                self._datasets[(data.name, data.version)] = data
            elif isinstance(data, DatasetValidated):
                self._validated.setdefault((data.name, data.version), data)
            elif isinstance(data, TrainingCompleted):
                self._runs[data.run_id] = data
                self._trained[(data.model, data.version)] = data
            elif isinstance(data, ModelPromoted):
                self._promoted[(data.model, data.version)] = data
                served = [v for v in self._served.get(data.model, []) if v != data.version]
                self._served[data.model] = [*served[-1:], data.version]
            else:
                return
            self._cache.clear()  # a new fact may complete any chain

    def resolve(self, model: str, version: str) -> Baseline | str:
        """The baseline of a served version, or why there is none (a drift_note)."""
        key = (model, version)
        found = self._cache.get(key)  # the per-record path: a dict read needs no lock
        if found is not None:
            return found
        with self._lock:
            found = self._cache.get(key)
            if found is None:
                found = self._cache[key] = self._resolve(model, version)
            return found

    def _resolve(self, model: str, version: str) -> Baseline | str:
        promoted = self._promoted.get((model, version))
        ref = promoted.dataset if promoted is not None else None
        if ref is None:
            run = None
            if promoted is not None and promoted.run_id:
                run = self._runs.get(promoted.run_id)
            run = run or self._trained.get((model, version))
            if run is None:
                return (
                    f"no training baseline: no model.promoted with a dataset and no "
                    f"training.completed for {model} version {version} in the log"
                )
            ref = run.dataset
        dataset = self._datasets.get((ref.name, ref.version))
        if dataset is None:
            return f"no training baseline: dataset.created {ref.name}@{ref.version} not found"
        validated = self._validated.get((ref.name, ref.version))
        if not dataset.columns and validated is not None and validated.columns:
            dataset = dataset.model_copy(update={"columns": validated.columns})
        baseline = baseline_of(dataset)
        if not baseline.features:
            return f"no training baseline: {ref.name}@{ref.version} has no column histograms"
        return baseline


def baseline_view(kafka: KafkaConfig, baselines: Baselines) -> LogView:
    """The lineage topics, from the beginning and then followed, folded into `baselines`:
    `start()` it, `wait()` for what was in the log at the start, `stop()` it."""
    return LogView(
        kafka, FOLLOWED, on_event=lambda item: baselines.add(item.event), name="streams-baselines"
    )
