"""The OpenLineage emitter on the bus: a registration → training → promotion → deployment
flow received by a local HTTP server as a Marquez would, each event valid against the
OpenLineage spec's JSON Schemas (vendored in spec/), and a replay by a new group sending the
very same bytes."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource

from mlbus.consumers.openlineage.service import OpenLineageEmitter, transport
from mlbus.errors import ConfigError
from mlbus.kafka.config import KafkaConfig
from mlbus.schemas.base import DatasetRef
from mlbus.schemas.datasets import ColumnSchema, ColumnStats, DatasetCreated
from mlbus.schemas.models import DeploymentUpdated, ModelPromoted
from mlbus.schemas.training import TrainingRequested, TrainingStarted
from mlbus.settings import OpenLineageSettings
from tests.conftest import unique
from tests.consumers.workflow.support import SHA, completed, failed, send, validated
from tests.mlbus.kafka.support import run_to_end
from tests.mlbus.test_cli import MLBUS, env, read_topic  # noqa: F401 - env is a fixture

SPEC = Path(__file__).parent / "spec"


class Receiver:
    """A Marquez stand-in: records the body of every POST and answers 201."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes]] = []
        lock = threading.Lock()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    posts.append((self.path, body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def bodies(self) -> list[bytes]:
        return [body for _, body in self.posts]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _registry() -> Registry:
    resources = [
        Resource.from_contents(json.loads(path.read_text()))
        for path in [SPEC / "OpenLineage.json", *sorted((SPEC / "facets").glob("*.json"))]
    ]
    return Registry().with_resources((r.id(), r) for r in resources if r.id())


REGISTRY = _registry()


def assert_valid(event: dict[str, Any]) -> None:
    """Valid against the core spec, and each facet against the schema its `_schemaURL`
    names (a facet whose schema is not vendored fails: only spec'd facets are emitted)."""
    core = REGISTRY.contents("https://openlineage.io/spec/2-0-2/OpenLineage.json")
    Draft202012Validator(core, registry=REGISTRY, format_checker=FormatChecker()).validate(event)
    facets = [*event["run"].get("facets", {}).values(), *event["job"].get("facets", {}).values()]
    for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
        for key in ("facets", "inputFacets", "outputFacets"):
            facets += dataset.get(key, {}).values()
    for facet in facets:
        url = facet["_schemaURL"]
        assert url.split("#")[0] in {str(u) for u in REGISTRY}, f"no spec for {url}"
        schema = {"$ref": url}
        Draft202012Validator(schema, registry=REGISTRY, format_checker=FormatChecker()).validate(
            facet
        )


def publish_flow(kafka: KafkaConfig) -> None:
    ref = DatasetRef(name="iris", version="v1")
    created = DatasetCreated(
        name="iris",
        version="v1",
        uri="file:///nowhere/iris/v1.parquet",
        content_hash=SHA,
        arrow_schema=[
            ColumnSchema(name="x", type="float64"),
            ColumnSchema(name="label", type="string"),
        ],
        num_rows=150,
        num_bytes=4096,
        description="the iris flowers",
    )
    stats = ColumnStats(kind="numeric", null_count=0, min=0.1, max=7.9, mean=3.0, std=1.0)
    send(kafka, created)
    (checked,) = send(kafka, validated("iris", "v1").model_copy(update={"columns": {"x": stats}}))
    request = TrainingRequested(model="m1", dataset=ref, family="mlp", pipeline="p1")
    (requested,) = send(kafka, request, causation=checked)
    (other,) = send(kafka, request.model_copy(update={"pipeline": None}))
    send(
        kafka,
        TrainingStarted(
            run_id="run-r1", model="m1", request_id=requested.id, dataset=ref, worker="w1"
        ),
        completed("m1", "r1", request_id=requested.id),
        failed("m1", other.id),
        ModelPromoted(model="m1", version="r1", run_id="run-r1", reason="better", actor="test"),
        DeploymentUpdated(model="m1", version="r1", replica="r-1", status="loaded"),
    )


def emit_all(kafka: KafkaConfig, url: str, group: str) -> OpenLineageEmitter:
    cfg = OpenLineageSettings(url=url, namespace="test-ns")
    with OpenLineageEmitter(kafka, cfg, group=group) as emitter:
        run_to_end(emitter.loop, timeout=60)
    return emitter


def test_the_flow_arrives_as_valid_openlineage_events_and_replays_identically(
    kafka, group, receiver
):
    publish_flow(kafka)
    emitter = emit_all(kafka, receiver.url, group)
    assert emitter.emitted == 7
    assert {path for path, _ in receiver.posts} == {"/api/v1/lineage"}
    events = [json.loads(b) for b in receiver.bodies()]
    for event in events:
        assert_valid(event)

    by_job: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_job.setdefault(e["job"]["name"], []).append(e)
    assert sorted(by_job) == ["deploy.m1", "promote.m1", "register.iris", "train.m1"]
    assert {e["job"]["namespace"] for e in events} == {"test-ns"}
    assert sorted(e["eventType"] for e in by_job["register.iris"]) == ["COMPLETE", "START"]
    assert len({e["run"]["runId"] for e in by_job["register.iris"]}) == 1

    training = {e["eventType"]: e for e in by_job["train.m1"]}
    assert sorted(training) == ["COMPLETE", "FAIL", "START"]
    start, done, fail = training["START"], training["COMPLETE"], training["FAIL"]
    assert start["run"]["runId"] == done["run"]["runId"] != fail["run"]["runId"]
    (data,) = done["inputs"]
    assert data["name"] == "datasets/iris"
    assert data["facets"]["version"]["datasetVersion"] == "v1"
    assert [f["name"] for f in data["facets"]["schema"]["fields"]] == ["x", "label"]
    metrics = data["inputFacets"]["dataQualityMetrics"]
    assert metrics["rowCount"] == 150 and metrics["columnMetrics"]["x"]["max"] == 7.9
    (model,) = done["outputs"]
    assert model["name"] == "models/m1" and model["facets"]["version"]["datasetVersion"] == "r1"
    # Parent: the pipeline run the request belongs to; the request no pipeline caused, none.
    parent = done["run"]["facets"]["parent"]
    assert (parent["job"]["namespace"], parent["job"]["name"]) == ("test-ns", "pipeline.p1")
    assert "parent" not in fail["run"]["facets"]
    assert fail["run"]["facets"]["errorMessage"]["message"] == "boom"

    (promotion,) = by_job["promote.m1"]
    assert promotion["outputs"][0]["name"] == "champions/m1"
    (deployment,) = by_job["deploy.m1"]
    assert deployment["eventType"] == "COMPLETE"
    assert deployment["inputs"][0]["facets"]["version"]["datasetVersion"] == "r1"

    first = receiver.bodies()
    emit_all(kafka, receiver.url, group + "-replay")  # the whole log again, a new group
    replayed = receiver.bodies()[len(first) :]
    assert sorted(replayed) == sorted(first)


def test_a_server_refusing_an_event_dead_letters_it_and_goes_on(kafka, group):
    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(422)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        send(kafka, ModelPromoted(model="m1", version="r1", reason="x", actor="test"))
        emitter = emit_all(kafka, f"http://127.0.0.1:{server.server_address[1]}", group)
    finally:
        server.shutdown()
        server.server_close()
    assert emitter.loop.stats.deadlettered == 1 and emitter.emitted == 0


def test_without_a_url_or_transport_it_refuses_to_start():
    with pytest.raises(ConfigError, match="MLBUS_OPENLINEAGE__URL"):
        transport(OpenLineageSettings(), KafkaConfig(bootstrap="127.0.0.1:1"))
    with pytest.raises(ValueError, match=r"needs openlineage\.url"):
        OpenLineageSettings(transport="http")


def test_mlbus_run_openlineage_sends_the_log_and_stops_on_sigterm(
    env: dict[str, str],  # noqa: F811 - the fixture imported above
    kafka: KafkaConfig,
    receiver: Receiver,
) -> None:
    publish_flow(kafka)
    proc = subprocess.Popen(
        [MLBUS, "run", "openlineage"],
        env=env | {"MLBUS_OPENLINEAGE__URL": receiver.url},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(receiver.posts) < 7:
            assert proc.poll() is None, f"mlbus run openlineage exited: {proc.communicate()}"
            assert time.monotonic() < deadline, f"{len(receiver.posts)} of 7 events within 60s"
            time.sleep(0.2)
        for body in receiver.bodies():
            assert_valid(json.loads(body))
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {out}\nstderr: {err}"
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_the_kafka_transport_writes_the_same_events_to_a_topic(kafka, group, receiver):
    publish_flow(kafka)
    cfg = OpenLineageSettings(transport="kafka", topic=unique("ol-"), namespace="test-ns")
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    for future in admin.create_topics([NewTopic(kafka.topic(cfg.topic), 1, 1)]).values():
        future.result(timeout=30)
    with OpenLineageEmitter(kafka, cfg, group=group) as emitter:
        run_to_end(emitter.loop, timeout=60)
    records = read_topic(kafka.bootstrap, kafka.topic(cfg.topic))
    assert len(records) == emitter.emitted == 7
    for record in records:
        event = json.loads(record.value())
        assert_valid(event)
        assert record.key().decode() == f"run:test-ns/{_key_job(event)}"
    # The same bytes as over HTTP.
    emit_all(kafka, receiver.url, group + "-http")
    assert sorted(r.value() for r in records) == sorted(receiver.bodies())


def _key_job(event: dict[str, Any]) -> str:
    parent = event["run"].get("facets", {}).get("parent")
    return parent["job"]["name"] if parent else event["job"]["name"]


def test_a_server_unavailable_for_a_while_gets_every_event_once_it_answers(kafka, group):
    answers = iter([503, 503])  # then 201 for good
    bodies: list[bytes] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = next(answers, 201)
            if status == 201:
                bodies.append(body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        publish_flow(kafka)
        emitter = emit_all(kafka, f"http://127.0.0.1:{server.server_address[1]}", group)
    finally:
        server.shutdown()
        server.server_close()
    assert emitter.loop.stats.retries >= 2 and emitter.loop.stats.deadlettered == 0
    assert len(bodies) == emitter.emitted == 7
