"""Rollback that is right, end to end on the real broker: `mlbus streams` (serving metrics,
drift, the feedback join, alert rules) and the workflow service, fed with the inference log
and delayed labels a serving replica and its clients would publish. A clearly better v2
under ordinary traffic drawn from v1's training data stays promoted; a v2 that fails 10 %
server-side, or answers 20 % wrong on labelled feedback, is rolled back within a bounded
number of windows with the evidence in the event; a client sending garbage (4xx) rolls
nothing back."""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime

import numpy as np
from sklearn.datasets import load_iris

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.datasets import ColumnSchema, ColumnStats, DatasetCreated, Histogram, ValueCount
from mlbus.schemas.serving import InferenceFeedback, InferenceLogged
from tests.consumers.workflow.support import completed, define, pipeline_text, running
from tests.mlbus.kafka.support import read_events, wait_until
from tests.streams.test_streams import started

SHA = "sha256:" + "ab" * 32
PER_WINDOW = 300  # requests per 1 s window: enough for the default 0.99 intervals
HISTORY = 10  # windows of v1 before v2 is promoted
V2_WINDOWS = 6
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def iris_dataset(x: np.ndarray, y: np.ndarray) -> DatasetCreated:
    """v1's training data as `dataset.created` describes it: 10-bin histograms per feature
    and the label distribution (the baseline drift compares with)."""
    columns = {}
    for j, name in enumerate(FEATURES):
        counts, edges = np.histogram(x[:, j], bins=10)
        columns[name] = ColumnStats(
            kind="numeric",
            null_count=0,
            min=float(edges[0]),
            max=float(edges[-1]),
            histogram=Histogram(edges=edges.tolist(), counts=counts.tolist()),
        )
    values, counts = np.unique(y, return_counts=True)
    columns["label"] = ColumnStats(
        kind="categorical",
        null_count=0,
        top_values=[
            ValueCount(value=str(v), count=int(c)) for v, c in zip(values, counts, strict=True)
        ],
    )
    return DatasetCreated(
        name="iris",
        version="v1",
        uri="file:///nowhere/iris/v1.parquet",
        content_hash=SHA,
        arrow_schema=[ColumnSchema(name=n, type="double") for n in FEATURES]
        + [ColumnSchema(name="label", type="string")],
        num_rows=len(y),
        num_bytes=1000,
        columns=columns,
        label_column="label",
    )


class Traffic:
    """Requests drawn from v1's training rows, answered by one version: its inference log
    records and its clients' feedback, with event times of our choosing."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.x, self.y = x, y
        self.rng = random.Random(seed)
        self.logged: list[tuple[InferenceLogged, datetime]] = []
        self.feedback: list[tuple[InferenceFeedback, datetime]] = []
        self.n = 0

    def window(
        self,
        model: str,
        version: str,
        start_ms: int,
        *,
        wrong_every: int = 0,
        fail_every: int = 0,
        garbage: int = 0,
    ) -> None:
        """PER_WINDOW answered requests in [start, start + 1 s): every `wrong_every`-th
        answer wrong, every `fail_every`-th a server error (500); plus `garbage` requests
        refused for their input (400). Feedback for each answer 50 ms later, in its window."""
        total = PER_WINDOW + garbage
        for i in range(total):
            self.n += 1
            rid = f"{model}-{version}-{self.n}"
            at = datetime.fromtimestamp((start_ms + i * 900 // total) / 1000, UTC)
            row = self.rng.randrange(len(self.y))
            inputs = [self.x[row].tolist()]
            if i >= PER_WINDOW:
                self._log(rid, model, version, at, ok=False, status=400, inputs=inputs)
                continue
            if fail_every and i % fail_every == 0:
                self._log(rid, model, version, at, ok=False, status=500, inputs=inputs)
                continue
            truth = int(self.y[row])
            answer = (truth + 1) % 3 if wrong_every and i % wrong_every == 0 else truth
            self._log(rid, model, version, at, predictions=[str(answer)], inputs=inputs)
            known = datetime.fromtimestamp(at.timestamp() + 0.05, UTC)
            self.feedback.append(
                (InferenceFeedback(request_id=rid, model=model, label=truth), known)
            )

    def single(self, model: str, version: str, at_ms: int) -> None:
        """One answered request and its label at `at_ms`: moves stream time past it."""
        self.n += 1
        rid = f"{model}-{version}-{self.n}"
        at = datetime.fromtimestamp(at_ms / 1000, UTC)
        self._log(rid, model, version, at, predictions=["0"], inputs=[self.x[0].tolist()])
        self.feedback.append((InferenceFeedback(request_id=rid, model=model, label=0), at))

    def _log(self, rid: str, model: str, version: str, at: datetime, **fields: object) -> None:
        logged = InferenceLogged.model_validate(
            {
                "request_id": rid,
                "model": model,
                "version": version,
                "replica": "rep-1",
                "latency_seconds": 0.002,
                "feature_names": list(FEATURES),
                **fields,
            }
        )
        self.logged.append((logged, at))

    def publish(self, kafka: KafkaConfig) -> None:
        with EventProducer(kafka, source="mlbus/serving") as producer:
            for payload, at in self.logged:
                producer.publish(payload, time=at)
            for payload, at in self.feedback:
                producer.publish(payload, time=at)
            producer.flush()
        self.logged.clear()
        self.feedback.clear()


MODELS = ("good", "failing", "wrong", "garbage")


def test_rollback_only_on_evidence_that_the_previous_version_does_better(
    kafka, group, run_streams, streams_env
):
    # Defaults for what decides (min samples 100, confidence 0.99, noise floor 0.99);
    # short windows and a short idle close keep it fast.
    for key in ("MIN_SAMPLES",):
        streams_env.pop(f"MLBUS_STREAMS__{key}", None)
    streams_env["MLBUS_STREAMS__MIN_ACCURACY"] = "0.9"
    x, y = load_iris(return_X_y=True)
    with EventProducer(kafka, source="tests") as producer:
        producer.publish(iris_dataset(x, y))
        producer.flush()
    for model in MODELS:
        define(kafka, pipeline_text(name=f"p-{model}", model=model, interval=0))

    with running(kafka, group):
        app = run_streams("--app-id", kafka.topic_prefix + "streams", "--idle-seconds", "3")
        started(app)
        traffic = Traffic(x, y, seed=3)
        now_ms = math.floor(time.time()) * 1000

        # v1 serves first: its windows are the history a rollback compares with. v1 of
        # `good` is the weaker model (every 4th answer wrong); the others' v1 are sound.
        for w in range(HISTORY):
            start = now_ms - (40 - w) * 1000
            for model in MODELS:
                traffic.window(
                    model, "v1", start, wrong_every=4 if model == "good" else 33, fail_every=0
                )
        traffic.publish(kafka)

        # The policy promotes v1, then a clearly better v2, for every model.
        with EventProducer(kafka, source="tests") as producer:
            for model in MODELS:
                producer.publish(completed(model, "v1", 0.91))
            producer.flush()
        wait_until(lambda: len(read_events(kafka, "model.promoted")) >= len(MODELS), "v1s")
        with EventProducer(kafka, source="tests") as producer:
            for model in MODELS:
                producer.publish(completed(model, "v2", 0.99))
            producer.flush()
        promoted = wait_until(
            lambda: (e := read_events(kafka, "model.promoted")) and len(e) >= 2 * len(MODELS) and e,
            "v2s",
        )
        assert {(e.data.model, e.data.version) for e in promoted} == {
            (m, v) for m in MODELS for v in ("v1", "v2")
        }
        v2_at = max(e.time for e in promoted)
        # v2's traffic is dated well ahead of the clock: an idle partition's stream time
        # moves to the wall clock (streams/windows.py), and event times behind it, still
        # being produced on a busy machine, would be late. Its windows close on stream time:
        # one last request and label per model, after them.
        v2_start = (math.floor(max(v2_at.timestamp(), time.time())) + 60) * 1000

        # v2 serves: `good` answers nearly always right, `failing` fails every 10th request
        # on the server, `wrong` answers every 5th wrong, `garbage` is sound but a client
        # sends as many invalid inputs (400) as valid ones.
        for w in range(V2_WINDOWS):
            start = v2_start + w * 1000
            traffic.window("good", "v2", start, wrong_every=100)
            traffic.window("failing", "v2", start, wrong_every=100, fail_every=10)
            traffic.window("wrong", "v2", start, wrong_every=5)
            traffic.window("garbage", "v2", start, wrong_every=100, garbage=PER_WINDOW)
        traffic.publish(kafka)
        for model in MODELS:
            traffic.single(model, "v2", v2_start + (V2_WINDOWS + 5) * 1000)
        traffic.publish(kafka)

        def rolled_back() -> list | None:
            back = [e for e in read_events(kafka, "model.promoted") if e.data.rollback]
            return back if len(back) >= 2 else None

        backs = wait_until(rolled_back, lambda: f"two rollbacks\n{app.log()}", timeout=120)
        # Every window of v2 closed (the accuracy windows are the last to close).
        last_end = datetime.fromtimestamp((v2_start + V2_WINDOWS * 1000) / 1000, UTC)

        def all_closed() -> bool:
            accuracy = read_events(kafka, "serving.accuracy")
            return {
                e.data.model
                for e in accuracy
                if e.data.version == "v2" and e.data.window_end == last_end
            } == set(MODELS)

        wait_until(all_closed, lambda: f"v2's last windows\n{app.log()}", timeout=60)
        time.sleep(2)  # the workflow acts on the last alerts, if any
        assert app.stop() == 0, app.log()

    promotions = read_events(kafka, "model.promoted")
    backs = [e for e in promotions if e.data.rollback]
    assert sorted((e.data.model, e.data.version, e.data.previous_version) for e in backs) == [
        ("failing", "v1", "v2"),
        ("wrong", "v1", "v2"),
    ]
    alerts = read_events(kafka, "serving.alert")
    firing = [a for a in alerts if a.data.status == "firing"]
    for back in backs:
        evidence = back.data.evidence
        cause = next(a for a in firing if a.id == back.data.cause)
        rule = "error_rate" if back.data.model == "failing" else "accuracy"
        assert cause.data.alert == rule and evidence["alert"]["alert"] == rule
        # Within a bounded number of windows: the third breached window of v2 fires.
        assert cause.data.windows == 3
        assert cause.data.window_end <= datetime.fromtimestamp((v2_start + 3000) / 1000, UTC), [
            (a.data.model, a.data.version, a.data.alert, a.data.status, a.data.window_end, a.time)
            for a in alerts
        ] + [(v2_start, [(e.data.model, e.data.version, e.time) for e in promotions])]
        comparison = evidence["comparison"]
        assert comparison["better"] is True and comparison["p_value"] < 0.01
        assert comparison["previous"]["version"] == "v1" and comparison["previous"]["n"] >= 1000
        assert comparison["current"]["version"] == "v2"
        assert cause.data.evidence["min_samples"] == 100
        assert len(cause.data.evidence["windows"]) == 3

    failing = next(a for a in firing if a.data.model == "failing" and a.data.version == "v2")
    assert failing.data.evidence["pooled"] == {"n": 900, "errors": 90}
    wrong = next(a for a in firing if a.data.model == "wrong" and a.data.version == "v2")
    assert wrong.data.evidence["pooled"]["wrong"] == 180

    # The better v2 and the one a client sent garbage to stay promoted: no alert of theirs
    # fired at all (no drift on traffic from the training data, 4xx counted apart).
    assert not [a for a in firing if a.data.model in ("good", "garbage") and a.data.version == "v2"]
    metrics = [
        e.data
        for e in read_events(kafka, "serving.metrics")
        if e.data.model == "garbage" and e.data.version == "v2" and e.data.window == "tumbling"
    ]
    assert metrics and all(m.client_errors == PER_WINDOW and m.errors == 0 for m in metrics)
    assert all(m.error_rate == 0.0 for m in metrics)
    champions = {}
    for e in promotions:
        champions[e.data.model] = e.data.version
    assert champions == {"good": "v2", "failing": "v1", "wrong": "v1", "garbage": "v2"}
    # Online accuracy of the better v2 on its labels, every window.
    good = [
        e.data
        for e in read_events(kafka, "serving.accuracy")
        if e.data.model == "good" and e.data.version == "v2" and e.data.window_end <= last_end
    ]
    assert len(good) == V2_WINDOWS and all(a.labelled == PER_WINDOW for a in good)
    assert all(a.accuracy >= 0.98 and a.unmatched == 0 and a.late == 0 for a in good)
