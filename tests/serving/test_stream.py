"""Stream inference: `inference.requests` answered on `inference.results` with the same key,
by the same models as HTTP; a request that cannot be answered gets a result with an error."""

from __future__ import annotations

import numpy as np

from mlbus.schemas.base import Tensor
from mlbus.schemas.serving import InferenceRequest
from tests.mlbus.kafka.support import publish, read_events, read_raw, wait_until
from tests.serving.conftest import promote, running, save, wait_version


def _request(request_id, rows, **changes):
    tensor = Tensor(
        name="input", shape=list(rows.shape), datatype="FP32", data=rows.reshape(-1).tolist()
    )
    fields = {"request_id": request_id, "model": "digits", "inputs": [tensor]}
    return InferenceRequest(**(fields | changes))


def test_stream_requests_are_answered_on_inference_results(kafka, store, digits, group):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    rows = digits.x[:3]
    with running(kafka, store, stream_group=group) as srv:
        wait_version(srv, "digits", "1")
        expected = srv.infer("digits", rows).json()
        publish(
            kafka,
            [
                _request("r-ok", rows),
                _request("r-unknown", rows, model="nope"),
                _request("r-shape", rows[:, :10]),
                _request("r-reply", rows, reply_topic="model.promoted"),
            ],
        )

        def answered():
            found = {e.data.request_id: e.data for e in read_events(kafka, "inference.results")}
            return found if len(found) >= 4 else None

        results = wait_until(answered, "four results")
    ok = results["r-ok"]
    assert ok.error is None and ok.version == "1"
    label, probabilities = ok.outputs
    assert label.data == expected["outputs"][0]["data"]
    assert np.allclose(probabilities.data, expected["outputs"][1]["data"], atol=1e-6)
    assert "UnknownModel" in results["r-unknown"].error
    assert "64 features" in results["r-shape"].error
    assert "reply_topic" in results["r-reply"].error
    keys = {m.key() for m in read_raw(kafka, kafka.topic("inference.results"))}
    assert keys == {b"r-ok", b"r-unknown", b"r-shape", b"r-reply"}
    # Nothing was written to the topic a request named as its reply topic.
    assert all(e.data.model == "digits" for e in read_events(kafka, "model.promoted"))
    assert len(read_events(kafka, "model.promoted")) == 1
