"""A model server one bad promotion cannot brick: a version that cannot load is reported
failed once (deployment.updated) and the previous version goes on serving, also after a
restart; an object store out of reach is tried again up to the `load_attempts` cap; and
until a restarted server has caught up, inference answers 503 with Retry-After, never 404
for a model it serves."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
from moto.server import ThreadedMotoServer

from mlbus.schemas.training import Artifact
from mlbus.serving.deployer import UNREACHABLE
from mlbus.storage import ObjectStore
from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import body, promote, running, save, wait_version


def _updates(kafka, model, version=None, status=None, replica=None):
    return [
        e.data
        for e in read_events(kafka, "deployment.updated")
        if e.data.model == model
        and (version is None or e.data.version == version)
        and (status is None or e.data.status == status)
        and (replica is None or e.data.replica == replica)
    ]


def _parquet_artifact(store: ObjectStore, card_uri: str | None) -> Artifact:
    """A dataset's Parquet file promoted as if it were weights, with its real hash (no write
    access needed: a dataset's URI and hash are public in dataset.created)."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"pixel_0": [1.0, 2.0, 3.0], "digit": [0, 1, 2]}), buffer)
    data = buffer.getvalue()
    store.write_bytes("datasets/digits/v1/data.parquet", data)
    return Artifact(
        uri=store.uri("datasets/digits/v1/data.parquet"),
        sha256="sha256:" + hashlib.sha256(data).hexdigest(),
        model_card_uri=card_uri,
        size_bytes=len(data),
    )


def test_a_promotion_that_is_not_safetensors_fails_once_and_the_previous_version_serves(
    kafka, store, digits
):
    v1 = save(store, digits.v1, "models/digits/v1")
    promote(kafka, "digits", "1", v1)
    rows = digits.x[:3]
    with running(kafka, store) as srv:
        wait_version(srv, "digits", "1")
        promote(kafka, "digits", "2", _parquet_artifact(store, v1.model_card_uri))
        (failed,) = wait_until(
            lambda: _updates(kafka, "digits", "2", "failed"), "version 2 reported failed"
        )
        assert "not a safetensors file" in failed.error and "InvalidArtifact" in failed.error
        r = srv.infer("digits", rows)
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        # The deployer goes on: a good promotion after the bad one is served.
        promote(kafka, "digits", "3", save(store, digits.v2, "models/digits/v3"))
        wait_version(srv, "digits", "3")
        assert len(_updates(kafka, "digits", "2", "failed")) == 1
        assert _updates(kafka, "digits", "2", "loaded") == []

    # The bad version as the champion of the log: promoted again after version 3.
    promote(kafka, "digits", "4", _parquet_artifact(store, v1.model_card_uri))
    with running(kafka, store) as srv:
        wait_until(lambda: _updates(kafka, "digits", "4", "failed"), "version 4 reported failed")

    # A restarted replica (same replica id) learns from deployment.updated that the champion
    # cannot load: it serves the newest version that does, is ready, and reports nothing new.
    with running(kafka, store) as srv, srv.client() as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}
        r = srv.infer("digits", rows)
        assert r.status_code == 200 and r.json()["model_version"] == "3"
        assert srv.infer("digits", rows, version="1").json()["model_version"] == "1"
        assert len(_updates(kafka, "digits", "4", "failed")) == 1
    # A replica that never reported on it tries it once, and serves version 3 too.
    with running(kafka, store, replica="other-replica") as srv:
        assert srv.infer("digits", rows).json()["model_version"] == "3"
        (other,) = _updates(kafka, "digits", "4", "failed", replica="other-replica")
        assert "not a safetensors file" in other.error
    assert len(_updates(kafka, "digits", "4", "failed", replica="test-replica")) == 1


def test_bad_cards_unknown_families_and_wrong_weights_each_fail_once(kafka, store, digits):
    v1 = save(store, digits.v1, "models/digits/v1")
    promote(kafka, "digits", "1", v1)

    def broken(version: str, **card_changes) -> Artifact:
        art = save(store, digits.v1, f"models/digits/{version}")
        card = digits.v1.card.model_copy(update=card_changes)
        key = store.key_of(art.model_card_uri)
        store.write_bytes(key, card.to_json())
        return art

    with running(kafka, store) as srv:
        wait_version(srv, "digits", "1")
        promote(kafka, "digits", "2", broken("2", family="transformer"))
        # A card whose cnn is narrower than the one the weights were trained for.
        narrow = {**digits.v1.card.hyperparameters, "channels": 4}
        promote(kafka, "digits", "3", broken("3", hyperparameters=narrow))
        bad_card = save(store, digits.v1, "models/digits/4")
        store.write_bytes(store.key_of(bad_card.model_card_uri), b"<html>not json</html>")
        promote(kafka, "digits", "4", bad_card)
        reasons = {}
        for version in ("2", "3", "4"):
            (failed,) = wait_until(
                lambda v=version: _updates(kafka, "digits", v, "failed"), f"{version} failed"
            )
            reasons[version] = failed.error
        assert "unknown model family 'transformer'" in reasons["2"]
        assert "InvalidArtifact" in reasons["3"] and "do not fit the cnn" in reasons["3"]
        assert "InvalidModelCard" in reasons["4"] and "not JSON" in reasons["4"]
        assert srv.infer("digits", digits.x[:1]).json()["model_version"] == "1"


# -- an object store out of reach ----------------------------------------------------------


@contextmanager
def _own_s3() -> Iterator[tuple[int, ObjectStore, list[ThreadedMotoServer]]]:
    """An S3 API of this test's own on a fixed port, so that it can be stopped (the store is
    down) and started again (moto keeps its buckets in the process). Yields the port, a store
    on it and the list holding the running server (empty while it is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    bucket = f"serving-{uuid.uuid4().hex[:8]}"
    options = {
        "key": "testing",
        "secret": "testing",
        "skip_instance_cache": True,
        "client_kwargs": {"region_name": "eu-west-1"},
        # One attempt per call: the deployer's own retries are what is tested.
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    store = ObjectStore(
        f"s3://{bucket}/root", s3_endpoint_url=f"http://127.0.0.1:{port}", storage_options=options
    )
    store.fs.mkdir(bucket, region_name="eu-west-1")
    try:
        yield port, store, servers
    finally:
        for server in servers:
            server.stop()


def _down(servers: list[ThreadedMotoServer]) -> None:
    servers.pop().stop()


def _up(servers: list[ThreadedMotoServer], port: int) -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    servers.append(server)


def test_an_unreachable_store_is_tried_up_to_the_cap_then_the_version_fails_once(kafka, digits):
    with _own_s3() as (port, store, servers):
        promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
        _down(servers)
        with running(kafka, store, load_attempts=3, load_retry_seconds=0.01) as srv:
            (failed,) = _updates(kafka, "digits", "1", "failed")  # reported before ready
            assert failed.error.startswith(UNREACHABLE) and "in 3 attempts" in failed.error
            _up(servers, port)
            # The deployer goes on once the store is back: a new promotion serves.
            promote(kafka, "digits", "2", save(store, digits.v2, "models/digits/v2"))
            wait_version(srv, "digits", "2")
            assert srv.infer("digits", digits.x[:1]).json()["model_version"] == "2"
            assert len(_updates(kafka, "digits", "1", "failed")) == 1


def test_until_caught_up_inference_answers_503_with_retry_after_then_200_never_404(kafka, digits):
    with _own_s3() as (port, store, servers):
        promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
        _down(servers)  # the restarted server cannot load its champion yet
        statuses: list[int] = []
        stop = threading.Event()
        with (
            running(
                kafka, store, wait_ready=False, load_attempts=10_000, load_retry_seconds=0.05
            ) as srv,
            srv.client() as c,
        ):

            def ask() -> None:  # a client asking all along, from before the store is back
                with srv.client() as mine:
                    while not stop.is_set():
                        r = mine.post("/v2/models/digits/infer", json=body(digits.x[:1]))
                        statuses.append(r.status_code)

            client = threading.Thread(target=ask)
            client.start()
            try:
                r = c.post("/v2/models/digits/infer", json=body(digits.x[:1]))
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["type"] == "NotReady"
                versioned = c.post("/v2/models/digits/versions/1/infer", json=body(digits.x[:1]))
                assert versioned.status_code == 503 and "retry-after" in versioned.headers
                # Not known at all, but the server cannot tell yet: ask again, too.
                assert c.post("/v2/models/nope/infer", json=body(digits.x[:1])).status_code == 503
                assert c.get("/v2/health/ready").status_code == 503
                wait_until(lambda: len(statuses) >= 3, "a few answers before the store is back")
                _up(servers, port)
                wait_until(lambda: srv.server.ready, "the server to catch up")
                wait_until(lambda: statuses and statuses[-1] == 200, "an answer from version 1")
            finally:
                stop.set()
                client.join(30)
            assert c.get("/v2/health/ready").json() == {"ready": True}
            assert set(statuses) <= {503, 200} and 503 in statuses, sorted(set(statuses))
            assert statuses.index(200) > 0 and set(statuses[statuses.index(200) :]) == {200}
            # Once caught up, a model that is not known at all is a 404.
            assert c.post("/v2/models/nope/infer", json=body(digits.x[:1])).status_code == 404
        assert [u.status for u in _updates(kafka, "digits")] == ["loaded"]
