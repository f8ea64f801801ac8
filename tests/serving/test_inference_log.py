"""The inference log: each answered request (in the sample) becomes an `inference.logged`
record with its version, predictions and raw feature vectors; sampling leaves records out;
a full queue drops samples and counts them instead of blocking."""

from __future__ import annotations

import time

import numpy as np

from mlbus.kafka.producer import EventProducer
from schemas.serving import InferenceLogged
from serving.inference_log import MAX_FEATURES, POLL_EVERY, InferenceLog, Sample, record
from serving.metrics import ServingMetrics
from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import promote, running, save, wait_version


def _sample(i: int, features: int = 4) -> Sample:
    x = np.full((2, features), float(i), dtype=np.float32)
    return Sample("m", "1", f"r{i}", 0.001, True, None, np.asarray(["a", "b"], dtype=object),
                  [f"f{j}" for j in range(features)], x)  # fmt: skip


def test_answered_requests_are_logged(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    rows = digits.x[:3]
    with running(kafka, store) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        r = c.post("/v2/models/digits/infer", json={"id": "req-7", "inputs": [{
            "name": "input", "shape": [3, 64], "datatype": "FP32",
            "data": rows.reshape(-1).tolist()}]})  # fmt: skip
        labels = r.json()["outputs"][0]["data"]
        c.post(
            "/v2/models/digits/infer",
            json={
                "id": "req-8",
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 64],
                        "datatype": "FP32",
                        "data": [float("1")] * 63,
                    }
                ],
            },
        )
        logged = wait_until(lambda: read_events(kafka, "inference.logged"), "inference.logged")
    ok = next(e.data for e in logged if e.data.request_id == "req-7")
    assert (ok.model, ok.version, ok.replica, ok.ok, ok.batch_size) == (
        "digits",
        "1",
        "test-replica",
        True,
        3,
    )
    assert ok.predictions == labels
    assert ok.feature_names == [f"pixel_{i}" for i in range(64)]
    assert np.array_equal(np.asarray(ok.inputs), rows)
    assert ok.latency_seconds > 0


def test_a_request_without_an_id_is_logged_under_the_id_it_was_answered_with(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        answered = [srv.infer("digits", digits.x[i : i + 1]).json()["id"] for i in range(3)]
        logged = wait_until(
            lambda: e if len(e := read_events(kafka, "inference.logged")) >= 3 else None,
            "three inference.logged",
        )  # fmt: skip
        assert c.get("/v2/health/live").status_code == 200
    assert len(set(answered)) == 3 and all(answered)
    assert sorted(e.data.request_id for e in logged) == sorted(answered)


def test_sampling_leaves_records_out():
    metrics = ServingMetrics()
    log = InferenceLog(producer=None, metrics=metrics, replica="r", sample_rate=0.25,  # type: ignore[arg-type]
                       queue_size=100_000)  # fmt: skip
    taken = sum(log.offer(_sample(i)) for i in range(4000))
    assert 800 < taken < 1200
    none = InferenceLog(producer=None, metrics=metrics, replica="r", sample_rate=0.0)  # type: ignore[arg-type]
    assert not any(none.offer(_sample(i)) for i in range(100))


def test_a_full_queue_drops_and_counts_without_blocking(kafka):
    metrics = ServingMetrics()
    producer = EventProducer(kafka, source="test")
    log = InferenceLog(producer, metrics, replica="r", queue_size=5)
    started = time.perf_counter()
    offered = [log.offer(_sample(i)) for i in range(20)]  # the publisher is not running yet
    assert time.perf_counter() - started < 5  # never waits for room (generous: no timing)
    assert offered == [True] * 5 + [False] * 15
    assert metrics.registry.get_sample_value("mlbus_serve_inference_log_dropped_total") == 15
    log.start()
    log.close()
    producer.close()
    logged = read_events(kafka, "inference.logged")
    assert sorted(e.data.request_id for e in logged) == [f"r{i}" for i in range(5)]
    assert metrics.registry.get_sample_value("mlbus_serve_inference_log_published_total") == 5


def test_more_records_than_a_poll_interval_are_all_published(kafka):
    metrics = ServingMetrics()
    producer = EventProducer(kafka, source="test")
    log = InferenceLog(producer, metrics, replica="r")
    n = POLL_EVERY * 2 + 5
    log.start()
    for i in range(n):
        assert log.offer(_sample(i))
    log.close()
    producer.close()
    assert metrics.registry.get_sample_value("mlbus_serve_inference_log_published_total") == n
    logged = read_events(kafka, "inference.logged")
    assert sorted(e.data.request_id for e in logged) == sorted(f"r{i}" for i in range(n))


def test_a_record_validates_as_built():
    """`record` skips validating the feature names and rows it builds itself: they are what
    the schema takes."""
    for features in (4, 3000):
        logged = record(_sample(2, features=features), "r")
        assert InferenceLogged.model_validate(logged.model_dump()) == logged


def test_wide_inputs_are_reduced_to_named_features():
    sample = _sample(1, features=3000)
    logged = record(sample, "r")
    assert len(logged.feature_names) <= MAX_FEATURES
    assert logged.feature_names[:2] == ["f0", "f3"]
    assert len(logged.inputs[0]) == len(logged.feature_names)
    assert logged.batch_size == 2 and logged.predictions == ["a", "b"]
