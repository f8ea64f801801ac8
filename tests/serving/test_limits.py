"""The serving edges a client can push on: a row cap per request (413 naming the limit), a
65,000-row request that does not stall a concurrent one-row request (split into batches that
take turns), request ids and logged error text bounded so that no `inference.logged` record
is too large for the stream processors."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import numpy as np
import orjson

from mlbus.kafka.config import MAX_RECORD_BYTES
from mlbus.serving.inference_log import MAX_ERROR_CHARS
from mlbus.serving.inference_log import MAX_RECORD_BYTES as MAX_LOGGED_BYTES
from tests.mlbus.kafka.support import read_events, read_raw, wait_until
from tests.serving.conftest import body, promote, running, save, wait_version


def _tensor(shape: Any, data: list[float]) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}]}


def test_rows_over_the_cap_and_long_request_ids_are_refused_naming_the_limit(kafka, store, digits):
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with (
        running(kafka, store, max_rows_per_request=100, max_request_id_bytes=64) as srv,
        srv.client() as c,
    ):
        wait_version(srv, "digits", "1")
        r = c.post("/v2/models/digits/infer", json=body(np.zeros((101, 64), np.float32)))
        assert r.status_code == 413 and r.json()["type"] == "TooManyRows"
        assert "101 rows" in r.json()["error"] and "at most 100" in r.json()["error"]
        assert "serving.max_rows_per_request" in r.json()["error"]
        # The cap is checked from the shape, before the data is read.
        r = c.post("/v2/models/digits/infer", json=_tensor([10**9, 64], []))
        assert r.status_code == 413 and "at most 100" in r.json()["error"]
        assert c.post("/v2/models/digits/infer", json=body(digits.x[:100])).status_code == 200

        doc = body(digits.x[:1])
        r = c.post("/v2/models/digits/infer", json={**doc, "id": "é" * 33})  # 66 bytes
        assert r.status_code == 400 and "66 bytes; at most 64" in r.json()["error"]
        r = c.post("/v2/models/digits/infer", json={**doc, "id": "x" * 64})
        assert r.status_code == 200 and r.json()["id"] == "x" * 64
        # An error quotes at most a bounded piece of what was sent.
        r = c.post("/v2/models/digits/infer", json=_tensor(list(range(100_000)), []))
        assert r.status_code == 400 and len(r.text) < 1000, len(r.text)


def test_no_logged_record_exceeds_its_bound(kafka, store, digits):
    """A 1.5 MB request id is refused (never logged), an error echoing a 1 MB name is cut,
    and every `inference.logged` record stays under the bound the processors read with."""
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store, max_body_bytes=64 * 1024 * 1024) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        huge_id = "i" * 1_500_000
        r = c.post("/v2/models/digits/infer", json={**body(digits.x[:1]), "id": huge_id})
        assert r.status_code == 400 and "1500000 bytes" in r.json()["error"]
        # A tensor that decodes, then fails: its error is logged with the sample.
        shape_doc = body(digits.x[:2])
        shape_doc["inputs"][0]["shape"] = [3, 64]  # 128 values for 192
        shape_doc["id"] = "bad-shape"
        assert c.post("/v2/models/digits/infer", json=shape_doc).status_code == 400
        r = c.post("/v2/models/digits/infer", json={**body(digits.x[:1]), "id": "ok"})
        assert r.status_code == 200
        big = c.post(
            "/v2/models/digits/infer",
            json={**body(np.tile(digits.x[:1], (60_000, 1))), "id": "tall"},
        )
        assert big.status_code == 200

        def logged() -> list[Any] | None:
            found = read_raw(kafka, kafka.topic("inference.logged"))
            return found if len(found) >= 2 else None

        records = wait_until(logged, "the samples to be logged")
    assert all(len(m.value()) <= MAX_LOGGED_BYTES < MAX_RECORD_BYTES for m in records)
    events = {e.data.request_id: e.data for e in read_events(kafka, "inference.logged")}
    assert not any(len(i) > 1000 for i in events)  # the huge id was never logged
    tall = events["tall"]
    assert tall.batch_size == 60_000 and len(tall.inputs or []) < 60_000
    assert "ok" in events


def test_logged_error_text_is_cut():
    from mlbus.serving.inference_log import Sample, encode, record

    sample = Sample("m", "1", "r", 0.1, False, "x" * 100_000, None, ["a"], None)
    logged = record(sample, "replica")
    assert logged.error is not None and len(logged.error) == MAX_ERROR_CHARS
    assert len(encode(sample, "replica", "mlbus/serving")) < 2 * MAX_ERROR_CHARS + 1000
    labels = np.array(["a-very-long-class-name-" * 4] * 100_000)
    tall = Sample("m", "1", "r", 0.1, True, None, labels, ["a"], np.zeros((100_000, 1)))
    value = encode(tall, "replica", "mlbus/serving")
    assert len(value) <= MAX_LOGGED_BYTES
    data = orjson.loads(value)["data"]
    assert data["batch_size"] == 100_000 and 0 < len(data["predictions"]) < 100_000


def test_a_large_request_does_not_stall_a_concurrent_one_row_request(kafka, store, digits):
    """A 65,000-row request (about 10 MB of JSON) and, while its batches run, a one-row
    request: the one-row request rides in the batch right after the one in flight when it
    arrives (its batch window, not the large request's), and is answered before the large
    request finishes. Asserted on batch order and composition, not on timings."""
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    marker = np.full((1, 64), 7.5, dtype=np.float32)  # no digit pixel is 7.5
    batches: list[tuple[int, bool]] = []  # (rows, holds the marker row), in start order
    arrived: list[int] = []  # batches started when the one-row request reached the batcher
    with running(kafka, store, max_body_bytes=64 * 1024 * 1024) as srv:
        wait_version(srv, "digits", "1")
        deployment = srv.server.registry.current("digits")
        assert deployment is not None and deployment.batcher is not None
        batcher = deployment.batcher
        forward, infer = batcher.forward, batcher.infer

        def recording_forward(x: np.ndarray) -> np.ndarray:
            batches.append((len(x), bool((x == 7.5).all(axis=1).any())))
            return forward(x)

        async def recording_infer(x: np.ndarray) -> np.ndarray:
            if len(x) == 1 and (x == 7.5).all():
                arrived.append(len(batches))
            return await infer(x)

        batcher.forward = recording_forward  # type: ignore[method-assign]
        batcher.infer = recording_infer  # type: ignore[method-assign]
        rows = np.tile(digits.x[:1000], (65, 1))
        large_body = orjson.dumps(body(rows))
        large: list[httpx.Response] = []
        done = threading.Event()

        def ask_large() -> None:
            with httpx.Client(base_url=srv.url, timeout=300) as c:
                large.append(
                    c.post(
                        "/v2/models/digits/infer",
                        content=large_body,
                        headers={"content-type": "application/json"},
                    )
                )
            done.set()

        thread = threading.Thread(target=ask_large)
        thread.start()
        try:
            wait_until(lambda: len(batches) >= 20, "the large request's batches to run", 120)
            with srv.client() as c:
                small = c.post("/v2/models/digits/infer", json=body(marker))
            small_answered_first = not done.is_set()
        finally:
            thread.join(300)
    assert small.status_code == 200 and large and large[0].status_code == 200
    assert small_answered_first, "the one-row request waited for the whole large request"
    [entered] = arrived
    [at] = [i for i, (_, has_marker) in enumerate(batches) if has_marker]
    # The batch in flight when it arrived, at most, ran before its own.
    assert at <= entered + 1, (entered, at)
    assert all(n <= srv.server.config.max_batch_size for n, _ in batches)
    assert sum(n for n, _ in batches) >= 65_001
    labels = large[0].json()["outputs"][0]["data"]
    assert len(labels) == 65_000
    assert labels[:1000] == labels[1000:2000]  # rows come back in order
