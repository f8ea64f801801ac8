"""Hot swap under load: a promotion is loaded beside the serving version and swapped in
without a failed request; a tampered artifact is refused and reported, and the serving
version goes on."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from tests.mlbus.kafka.support import read_events, wait_until
from tests.serving.conftest import body, promote, running, save, wait_version


def _deployments(kafka, model):
    return [e.data for e in read_events(kafka, "deployment.updated") if e.data.model == model]


def test_promotion_under_load_switches_versions_without_a_failed_request(kafka, store, digits):
    v1 = save(store, digits.v1, "models/digits/v1")
    v2 = save(store, digits.v2, "models/digits/v2")
    promote(kafka, "digits", "1", v1)
    rows = digits.x[:4]
    payload = body(rows)
    with running(kafka, store, max_wait_us=1000) as srv:
        wait_version(srv, "digits", "1")
        results: list[tuple[float, int, str, float]] = []  # (answered, status, version, sent)
        errors: list[str] = []
        promoted_at: list[float] = []

        async def client(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                while not stop.is_set():
                    sent = time.perf_counter()
                    try:
                        r = await c.post("/v2/models/digits/infer", json=payload)
                    except httpx.HTTPError as e:
                        errors.append(repr(e))
                        continue
                    version = r.json().get("model_version", "") if r.status_code == 200 else ""
                    results.append((time.perf_counter(), r.status_code, version, sent))
                    if r.status_code != 200:
                        errors.append(r.text)

        async def load() -> None:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(client(stop)) for _ in range(8)]
            deadline = time.perf_counter() + 30
            while len(results) < 20 and time.perf_counter() < deadline:  # v1 under load first
                await asyncio.sleep(0.05)
            promoted_at.append(time.perf_counter())
            await asyncio.to_thread(promote, kafka, "digits", "2", v2)
            deadline = time.perf_counter() + 30
            while time.perf_counter() < deadline:  # keep the load on after the switch
                done = [t for t, _, v, _ in results if v == "2"]
                if done and time.perf_counter() - done[0] > 0.5:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)

        asyncio.run(load())
        assert not errors, errors[:3]
        versions = [v for _, _, v, _ in results]
        assert versions[0] == "1" and versions[-1] == "2"
        assert all(s == 200 for _, s, _, _ in results)
        first_v2 = next(t for t, _, v, _ in results if v == "2")
        # Reported, not asserted (a loaded machine must not make this flaky): the switch
        # delay from producing the event to the first response from version 2.
        delay = first_v2 - promoted_at[0]
        print(
            f"\nswitch to v2 {delay * 1000:.0f} ms after the promotion was produced; "
            f"{len(results)} requests, 0 failed"
        )
        # Requests in flight at the swap may still finish on version 1 after the first answer
        # from version 2; a request sent after that answer is served by version 2.
        assert {v for _, _, v, sent in results if sent > first_v2} == {"2"}
        # Both versions stay reachable by version.
        assert srv.infer("digits", rows, version="1").json()["model_version"] == "1"
        assert srv.infer("digits", rows, version="2").json()["model_version"] == "2"

        updates = wait_until(
            lambda: (
                [u for u in _deployments(kafka, "digits") if u.status == "loaded"]
                if len(_deployments(kafka, "digits")) >= 2
                else None
            ),
            "deployment.updated for both loads",
        )
        assert [u.version for u in updates] == ["1", "2"]
        assert all(u.replica == "test-replica" and u.load_seconds > 0 for u in updates)
        assert updates[1].artifact_sha256 == v2.sha256

        # A tampered artifact: the bytes change after the event's sha256 was taken.
        v3 = save(store, digits.v1, "models/digits/v3")
        key = store.key_of(v3.uri)
        weights = bytearray(store.read_bytes(key))
        weights[-1] ^= 0xFF
        store.write_bytes(key, bytes(weights))
        promote(kafka, "digits", "3", v3)
        failed = wait_until(
            lambda: [u for u in _deployments(kafka, "digits") if u.status == "failed"],
            "deployment.updated status failed",
        )
        assert failed[0].version == "3" and "hash" in failed[0].error
        r = srv.infer("digits", rows)
        assert r.status_code == 200 and r.json()["model_version"] == "2"
        # A missing artifact too.
        gone = save(store, digits.v1, "models/digits/v4")
        store.delete(store.key_of(gone.uri))
        promote(kafka, "digits", "4", gone)
        wait_until(
            lambda: any(
                u.version == "4" and u.status == "failed" for u in _deployments(kafka, "digits")
            ),
            "the missing artifact reported failed",
        )
        assert srv.infer("digits", rows).json()["model_version"] == "2"
        metrics = srv.client().get("/metrics").text
        assert 'mlbus_serve_model_loaded{model="digits",role="current",version="2"} 1.0' in metrics


def test_a_restarted_replica_serves_the_champion_and_its_previous_version(kafka, store, digits):
    v1 = save(store, digits.v1, "models/digits/v1")
    v2 = save(store, digits.v2, "models/digits/v2")
    promote(kafka, "digits", "1", v1)
    promote(kafka, "digits", "2", v2)
    with running(kafka, store) as srv:
        rows = digits.x[:2]
        assert srv.infer("digits", rows).json()["model_version"] == "2"
        assert srv.infer("digits", rows, version="1").json()["model_version"] == "1"
        # A rollback to the previous version is a swap, no reload.
        promote(kafka, "digits", "1", v1, rollback=True)
        wait_version(srv, "digits", "1")
        probabilities = srv.infer("digits", rows).json()["outputs"][1]["data"]
        assert np.isclose(sum(probabilities[:10]), 1.0, atol=1e-4)
