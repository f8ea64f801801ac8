"""Stream inference: `inference.requests` answered on `inference.results` with the same key,
by the same models as HTTP; a request that cannot be answered gets a result with an error.
Reply topics only under the configured prefix and only existing ones (never created); a
request id over the limit dead-lettered; a model being loaded waited for (HTTP's 503), not
answered with an error."""

from __future__ import annotations

import numpy as np
from confluent_kafka.admin import AdminClient, NewTopic

from mlbus.kafka.admin import topic_names
from mlbus.schemas.base import Tensor
from mlbus.schemas.codec import decode
from mlbus.schemas.serving import InferenceRequest
from tests.mlbus.kafka.support import dead_letters, publish, read_events, read_raw, wait_until
from tests.serving.conftest import promote, running, save, wait_version
from tests.serving.test_deployer import _down, _own_s3, _up


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


def _results(kafka, count, topic="inference.results"):
    def answered():
        found = {e.data.request_id: e.data for e in read_events(kafka, topic)}
        return found if len(found) >= count else None

    return wait_until(answered, f"{count} results on {topic}")


def test_reply_topics_are_restricted_to_the_prefix_and_never_created(kafka, store, digits, group):
    mine = kafka.topic("replies.mine")
    admin = AdminClient(kafka.admin())
    admin.create_topics([NewTopic(mine, 1, 1)])[mine].result(10)
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    rows = digits.x[:1]
    with running(kafka, store, stream_group=group, reply_topic_prefix="replies.") as srv:
        wait_version(srv, "digits", "1")
        publish(
            kafka,
            [
                _request("r-mine", rows, reply_topic="replies.mine"),
                _request("r-missing", rows, reply_topic="replies.nobody"),
                _request("r-outside", rows, reply_topic="inference.results.x"),
                _request("r-default", rows),
            ],
        )
        results = _results(kafka, 3)
        [record] = read_raw(kafka, mine)
        answer = decode(record.value(), expected_type="inference.results")
    assert answer.data.request_id == "r-mine" and answer.data.error is None
    assert results["r-default"].error is None and "r-mine" not in results
    assert "replies.nobody' does not exist" in results["r-missing"].error
    assert "never creates topics" in results["r-missing"].error
    assert "must be inference.results or replies.<suffix>" in results["r-outside"].error
    topics = topic_names(kafka)
    assert kafka.topic("replies.nobody") not in topics
    assert kafka.topic("inference.results.x") not in topics


def test_a_request_id_over_the_limit_is_dead_lettered_with_the_limit(kafka, store, digits, group):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store, stream_group=group, max_request_id_bytes=64) as srv:
        wait_version(srv, "digits", "1")
        publish(kafka, [_request("x" * 65, digits.x[:1]), _request("after", digits.x[:1])])
        results = _results(kafka, 1)
        [dead] = wait_until(lambda: dead_letters(kafka) or None, "a dead letter")
    assert set(results) == {"after"}
    assert "65 bytes; at most 64" in dead.data.reason


def test_a_model_being_loaded_is_waited_for_then_answered(kafka, digits, group):
    """Promoted while the object store is down: HTTP answers 503 while the load is retried;
    the stream request is not answered with an error meanwhile, but once the model loads."""
    with _own_s3() as (port, store, servers):
        artifact = save(store, digits.v1, "models/digits/v1")
        with running(
            kafka, store, stream_group=group, load_attempts=10_000, load_retry_seconds=0.05
        ) as srv:
            _down(servers)
            promote(kafka, "digits", "1", artifact)
            wait_until(lambda: srv.server.deployer.loading("digits"), "the load to start")
            assert srv.infer("digits", digits.x[:1]).status_code == 503
            publish(kafka, [_request("while-loading", digits.x[:1])])
            stream = srv.server.stream
            assert stream is not None
            wait_until(lambda: stream.loop.stats.retries >= 2, "the request to be retried")
            assert not read_events(kafka, "inference.results")  # no error answered
            _up(servers, port)
            results = _results(kafka, 1)
    answered = results["while-loading"]
    assert answered.error is None and answered.version == "1"
