"""The workflow's HTTP routes on a FastAPI app, against the real broker: apply (201, 200
unchanged, 400 naming the line), list pipelines, manual promote and rollback, and their
errors. (`GET /models` is a lineage-store query: tests/mlbus/test_api.py.)"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from mlbus.consumers.workflow.api import create_router
from mlbus.http import install_error_handlers
from tests.consumers.workflow.support import DIGITS_YAML, completed, send
from tests.mlbus.kafka.support import read_events


def test_pipelines_and_models_over_http(kafka):
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(create_router(lambda: kafka))
    client = TestClient(app)
    text = DIGITS_YAML.read_text()

    bad = client.post(
        "/pipelines",
        content=text.replace("family: cnn", "family: rnn"),
        headers={"content-type": "application/yaml"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "InvalidPipeline"
    assert bad.json()["error"]["message"].startswith("request body line 9: family: unknown")
    created = client.post("/pipelines", json={"definition": text, "actor": "user:ann"})
    assert created.status_code == 201 and created.json()["revision"] == 1
    again = client.post("/pipelines", content=text, headers={"x-mlbus-actor": "user:bob"})
    assert again.status_code == 200 and not again.json()["published"]
    assert [p["name"] for p in client.get("/pipelines").json()] == ["digits"]

    send(kafka, completed("digits", "v1", 0.96), completed("digits", "v2", 0.97))
    missing = client.post("/models/digits/promote", json={"version": "v9", "reason": "try"})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "UnknownModel"
    promoted = client.post("/models/digits/promote", json={"version": "v1", "reason": "first"})
    assert promoted.status_code == 201 and promoted.json()["actor"] == "http"
    assert promoted.json()["artifact"]["uri"].endswith("digits/v1/model.safetensors")
    nothing = client.post("/models/digits/rollback", json={"reason": "oops"})
    assert nothing.status_code == 409 and nothing.json()["error"]["type"] == "NothingToRollBack"
    client.post("/models/digits/promote", json={"version": "v2", "reason": "better"})
    back = client.post("/models/digits/rollback", json={"reason": "v2 is slow", "actor": "ops"})
    assert back.status_code == 201 and (back.json()["version"], back.json()["rollback"]) == (
        "v1",
        True,
    )
    assert client.get("/models").status_code == 404  # the listing is the lineage store's
    *_, champion = read_events(kafka, "model.promoted")
    assert (champion.data.version, champion.data.actor) == ("v1", "ops")
    assert len(read_events(kafka, "model.promoted")) == 3
