"""The inference log: each answered request (in the sample) becomes an `inference.logged`
record with its version, predictions and raw feature vectors; sampling leaves records out;
a full queue drops samples and counts them instead of blocking."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from mlbus.kafka.config import KafkaConfig
from mlbus.kafka.producer import EventProducer
from mlbus.schemas.codec import decode, encode_new
from mlbus.schemas.serving import InferenceLogged
from mlbus.serving.inference_log import (
    MAX_FEATURES,
    MAX_VALUES,
    InferenceLog,
    Sample,
    encode,
    producer_options,
    record,
)
from mlbus.serving.metrics import ServingMetrics
from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import promote, running, save, wait_version


def _sample(i: int, features: int = 4) -> Sample:
    x = np.full((2, features), float(i), dtype=np.float32)
    return Sample(
        "m",
        "1",
        f"r{i}",
        0.001,
        True,
        None,
        np.asarray(["a", "b"], dtype=object),
        [f"f{j}" for j in range(features)],
        x,
    )


def test_answered_requests_are_logged(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    rows = digits.x[:3]
    with running(kafka, store) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        r = c.post(
            "/v2/models/digits/infer",
            json={
                "id": "req-7",
                "inputs": [
                    {
                        "name": "input",
                        "shape": [3, 64],
                        "datatype": "FP32",
                        "data": rows.reshape(-1).tolist(),
                    }
                ],
            },
        )
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
        )
        assert c.get("/v2/health/live").status_code == 200
    assert len(set(answered)) == 3 and all(answered)
    assert sorted(e.data.request_id for e in logged) == sorted(answered)


def test_sampling_leaves_records_out():
    metrics = ServingMetrics()
    log = InferenceLog(
        producer=None,
        metrics=metrics,
        replica="r",
        sample_rate=0.25,  # type: ignore[arg-type]
        queue_size=100_000,
    )
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


def test_with_the_broker_away_the_log_holds_a_bounded_buffer_and_counts_the_rest():
    """Nothing listens at the address (the broker is being replaced): the producer holds
    `buffer` records, the queue as many, every other sample is dropped and counted, and the
    publisher never blocks the requests."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    away = KafkaConfig(bootstrap=f"127.0.0.1:{port}", embedded=True)
    buffer = 5
    producer = EventProducer(away, source="test", **producer_options(buffer))
    metrics = ServingMetrics()
    log = InferenceLog(producer, metrics, replica="r", queue_size=buffer)
    log.gather = 0
    log.start()
    offered = 0
    for i in range(200):
        offered += log.offer(_sample(i))
        time.sleep(0.001)

    def counted() -> float | None:
        published = metrics.registry.get_sample_value("mlbus_serve_inference_log_published_total")
        dropped = metrics.registry.get_sample_value("mlbus_serve_inference_log_dropped_total")
        return published if published + dropped == 200 and log._queue.empty() else None

    published = wait_until(counted, "every sample published or dropped")
    assert published == buffer  # held by the producer, for when the broker is back
    assert offered >= buffer
    log._queue.put(None)  # stop without the close's flush wait
    log._thread.join(15)  # type: ignore[union-attr]


def test_more_records_than_a_burst_are_all_published(kafka):
    metrics = ServingMetrics()
    producer = EventProducer(kafka, source="test")
    log = InferenceLog(producer, metrics, replica="r", queue_size=50)  # bursts of <= 50
    n = 133
    for i in range(50):  # a full queue before the publisher starts: more than one burst
        assert log.offer(_sample(i))
    log.start()
    for i in range(50, n):
        while not log.offer(_sample(i)):  # full: the publisher makes room
            time.sleep(0.001)
    log.close()
    producer.close()
    assert metrics.registry.get_sample_value("mlbus_serve_inference_log_published_total") == n
    logged = read_events(kafka, "inference.logged")
    assert sorted(e.data.request_id for e in logged) == sorted(f"r{i}" for i in range(n))
    assert {e.type for e in logged} == {"inference.logged"}


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


# -- the publisher's encoder against the payload model -------------------------------------

_WHEN = datetime(2026, 3, 1, 14, 0, 0, 123_456, tzinfo=UTC)


def _encoded_both_ways(sample: Sample) -> tuple[bytes, bytes]:
    """`encode` and the codec's encoding of `record`, with the same id and time."""
    fast = encode(sample, "replica-1", "mlbus/serving", event_id="id-1", time=_WHEN)
    _, slow = encode_new(
        record(sample, "replica-1"), source="mlbus/serving", event_id="id-1", time=_WHEN
    )
    return fast, slow


def assert_same_json(fast: bytes, slow: bytes) -> None:
    """The same JSON value, with its keys in the same order."""
    a, b = orjson.loads(fast), orjson.loads(slow)
    assert a == b
    assert list(a) == list(b) and list(a["data"]) == list(b["data"])


_finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def samples(draw: st.DrawFn) -> Sample:
    features = draw(st.sampled_from([1, 4, 64, MAX_FEATURES, MAX_FEATURES + 1, 3000]))
    rows = draw(st.integers(min_value=0, max_value=40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    with_inputs = draw(st.booleans())
    inputs = None
    if with_inputs:
        fill = np.asarray(draw(st.lists(_finite, min_size=1, max_size=8)), dtype=dtype)
        inputs = np.resize(fill, (rows, features)).astype(dtype)
    ok = draw(st.booleans())
    predictions = None
    if ok:
        labels = draw(st.lists(st.sampled_from(["0", "7", "cat"]), min_size=rows, max_size=rows))
        predictions = np.asarray(labels, dtype=object)
    return Sample(
        draw(st.sampled_from(["digits", "wide-cnn"])),
        draw(st.sampled_from(["1", "v2"])),
        draw(st.text(min_size=1, max_size=12)),
        draw(st.floats(min_value=-1.0, max_value=10.0)),  # a clock step back: clamped at 0
        ok,
        None if ok else draw(st.text(max_size=30)),
        predictions,
        [f"f{j}" for j in range(features)],
        inputs,
    )


@settings(max_examples=150, deadline=None)
@given(sample=samples())
def test_the_publisher_writes_what_the_payload_model_would(sample):
    """`encode` writes the record without building the model: the JSON value the codec
    writes for `record(sample)` (so, too, a record the contract accepts), key for key in the
    same order; only a number's spelling may differ (orjson writes a float32 1e13 as
    "1e+13", pydantic the float64 it reads back as "10000000000000.0")."""
    fast, slow = _encoded_both_ways(sample)
    assert_same_json(fast, slow)
    event = decode(fast, expected_type="inference.logged")
    assert event.data == record(sample, "replica-1")
    assert (event.id, event.time, event.correlationid) == ("id-1", _WHEN, "id-1")
    assert event.dataschema == "mlbus:schemas/inference.logged/1"


def test_the_publisher_writes_each_kind_of_sample_as_the_model_would():
    """The cases the property covers by chance, named: an error (no predictions, inputs
    kept), no inputs at all, wide inputs reduced, more rows than MAX_VALUES allows."""
    wide = _sample(3, features=3000)
    error = Sample(
        "m",
        "1",
        "r-err",
        0.002,
        False,
        "InvalidInput: boom",
        None,
        ["a", "b"],
        np.ones((3, 2), dtype=np.float32),
    )
    bare = Sample("m", "1", "r-bare", 0.002, False, "NotReady", None, ["a"], None)
    rows = np.random.default_rng(0).random((600, 64))
    tall = Sample(
        "m",
        "1",
        "r-tall",
        0.0,
        True,
        None,
        np.asarray(["x"] * 600, dtype=object),
        [f"f{j}" for j in range(64)],
        rows,
    )
    for sample in (wide, error, bare, tall):
        fast, slow = _encoded_both_ways(sample)
        assert_same_json(fast, slow)
        data = decode(fast, expected_type="inference.logged").data
        assert data == record(sample, "replica-1")
    wide_data = decode(_encoded_both_ways(wide)[0], expected_type="inference.logged").data
    assert wide_data.feature_names[:2] == ["f0", "f3"] and len(wide_data.inputs[0]) <= MAX_FEATURES
    error_data = decode(_encoded_both_ways(error)[0], expected_type="inference.logged").data
    assert (error_data.ok, error_data.predictions, error_data.batch_size) == (False, [], 3)
    bare_data = decode(_encoded_both_ways(bare)[0], expected_type="inference.logged").data
    assert (bare_data.inputs, bare_data.feature_names, bare_data.batch_size) == (None, None, 0)
    tall_data = decode(_encoded_both_ways(tall)[0], expected_type="inference.logged").data
    assert tall_data.batch_size == 600 and len(tall_data.inputs) == MAX_VALUES // 64
    assert np.array_equal(np.asarray(tall_data.inputs), tall.inputs[: MAX_VALUES // 64])
