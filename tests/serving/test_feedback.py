"""Delayed labels through the model server: `POST /v2/models/{m}/feedback` publishes the
true label of a request this replica answered to `inference.feedback`; feedback for an
unknown request id, another model, or a label that is not a class of the answering version
is refused with a clear error and publishes nothing. A refused infer request is logged with
its 4xx status (the client's), not as a server error."""

from __future__ import annotations

import numpy as np
import pytest

from mlbus.serving.feedback import Answered, FeedbackRequest, InvalidFeedback, check
from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import body, promote, running, save, wait_version


def test_feedback_for_an_answered_request_is_published_and_bad_feedback_is_not(
    kafka, store, digits
):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store) as srv:
        wait_version(srv, "digits", "1")
        answer = srv.infer("digits", digits.x[:1])
        assert answer.status_code == 200, answer.text
        rid = answer.json()["id"]
        truth = int(digits.y[0])
        with srv.client() as c:
            ok = c.post("/v2/models/digits/feedback", json={"request_id": rid, "label": truth})
            assert ok.status_code == 202, ok.text
            assert ok.json()["version"] == "1" and ok.json()["request_id"] == rid
            refused = {
                "unknown id": c.post(
                    "/v2/models/digits/feedback", json={"request_id": "nope", "label": truth}
                ),
                "other model": c.post(
                    "/v2/models/iris/feedback", json={"request_id": rid, "label": truth}
                ),
                "not a class": c.post(
                    "/v2/models/digits/feedback", json={"request_id": rid, "label": "zebra"}
                ),
                "fractional": c.post(
                    "/v2/models/digits/feedback", json={"request_id": rid, "label": 2.5}
                ),
                "no label": c.post("/v2/models/digits/feedback", json={"request_id": rid}),
                "not json": c.post("/v2/models/digits/feedback", content=b"{nope"),
            }
            # A client's mistake on infer: refused (400) and logged as the client's.
            bad = c.post("/v2/models/digits/infer", json=body(digits.x[:1, :10]))
            assert bad.status_code == 400
        statuses = {k: (r.status_code, r.json()["type"]) for k, r in refused.items()}
        assert statuses == {
            "unknown id": (404, "UnknownRequest"),
            "other model": (404, "UnknownRequest"),
            "not a class": (400, "InvalidFeedback"),
            "fractional": (400, "InvalidFeedback"),
            "no label": (400, "MalformedRequest"),
            "not json": (400, "MalformedRequest"),
        }
        assert "zebra" in refused["not a class"].json()["error"]

    (event,) = read_events(kafka, "inference.feedback")
    assert event.id == ok.json()["event_id"]
    data = event.data
    assert (data.request_id, data.model, data.version, data.label) == (rid, "digits", "1", truth)
    logged = wait_until(
        lambda: (e := read_events(kafka, "inference.logged")) and len(e) >= 2 and e,
        "both requests logged",
    )
    by_ok = {e.data.ok: e.data for e in logged}
    assert by_ok[True].request_id == rid and by_ok[True].status is None
    assert by_ok[False].status == 400


def test_feedback_to_a_regression_model_is_its_true_value() -> None:
    answered = Answered(10)
    answered.add("r1", "diabetes", "3", np.asarray([], dtype=object))
    assert check(answered, "diabetes", FeedbackRequest(request_id="r1", label=151)) == ("3", 151.0)
    with pytest.raises(InvalidFeedback, match="regression model"):
        check(answered, "diabetes", FeedbackRequest(request_id="r1", label="high"))
