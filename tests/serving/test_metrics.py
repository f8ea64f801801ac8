"""The model server's /metrics: one request counter with the status code, agreeing with the
latency histogram; a retired version's series leave; process and consumer-lag series are
there; Prometheus's own checker (promtool) accepts the page."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mlbus.serving.metrics import ServingMetrics
from tests.mlbus.kafka.support import publish, wait_until
from tests.promtool import check_metrics
from tests.serving.conftest import promote, running, save, wait_version
from tests.serving.test_stream import _request, _results


def _samples(page: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def _sum(page: str, name: str, **labels: str) -> float:
    return sum(
        value
        for (n, ls), value in _samples(page).items()
        if n == name and all(dict(ls).get(k) == v for k, v in labels.items())
    )


def test_requests_latency_retirement_lag_and_promtool(kafka, store, digits, group):
    kafka = replace(kafka, stats_interval_ms=200)  # consumer lag reported quickly
    rows = digits.x[:2]
    promote(kafka, "digits", "1", save(store, digits.v1, "models/digits/v1"))
    with running(kafka, store, stream_group=group) as srv, srv.client() as c:
        wait_version(srv, "digits", "1")
        assert srv.infer("digits", rows).status_code == 200
        assert c.post("/v2/models/digits/infer", content=b"{").status_code == 400
        assert c.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
        publish(kafka, [_request("k1", rows)])
        _results(kafka, 1)

        page = c.get("/metrics").text
        # Every request counted once, by code, and observed once in the histogram.
        ok = {"model": "digits", "version": "1", "protocol": "http", "code": "200"}
        assert _sum(page, "mlbus_serve_requests_total", **ok) == 1
        bad = {"model": "digits", "version": "", "protocol": "http", "code": "400"}
        assert _sum(page, "mlbus_serve_requests_total", **bad) == 1
        assert _sum(page, "mlbus_serve_requests_total", model="_unknown", code="404") == 1
        kafka_ok = {"model": "digits", "version": "1", "protocol": "kafka", "code": "200"}
        assert _sum(page, "mlbus_serve_requests_total", **kafka_ok) == 1
        for model, version, protocol in (
            ("digits", "1", "http"),
            ("digits", "", "http"),
            ("_unknown", "", "http"),
            ("digits", "1", "kafka"),
        ):
            mvp = {"model": model, "version": version, "protocol": protocol}
            assert _sum(page, "mlbus_serve_requests_total", **mvp) == _sum(
                page, "mlbus_serve_request_latency_seconds_count", **mvp
            ), mvp
        assert _sum(page, "process_resident_memory_bytes") > 0
        assert _sum(page, "python_gc_collections_total") > 0

        # The stream inference group's lag, per partition of inference.requests.
        def lag() -> str | None:
            text = c.get("/metrics").text
            mine = {"group": group, "topic": kafka.topic("inference.requests")}
            found = [
                value
                for (name, labels), value in _samples(text).items()
                if name == "mlbus_consumer_lag" and mine.items() <= dict(labels).items()
            ]
            return text if found and all(value >= 0 for value in found) else None

        page = wait_until(lag, "the stream group's lag on /metrics")
        check_metrics(page)

        # Versions 2 and 3 push version 1 out (a replica keeps current and previous): its
        # series leave /metrics, version 2's stay.
        promote(kafka, "digits", "2", save(store, digits.v2, "models/digits/v2"))
        wait_version(srv, "digits", "2")
        assert srv.infer("digits", rows).status_code == 200
        promote(kafka, "digits", "3", save(store, digits.v1, "models/digits/v3"))
        wait_version(srv, "digits", "3")
        page = c.get("/metrics").text
        assert not [line for line in page.splitlines() if 'version="1"' in line], page
        assert _sum(page, "mlbus_serve_requests_total", version="2", code="200") == 1
        assert _sum(page, "mlbus_serve_model_loaded", version="2", role="previous") == 1
        assert _sum(page, "mlbus_serve_model_loaded", version="3", role="current") == 1
        check_metrics(page)


def test_a_retired_versions_stragglers_do_not_bring_its_series_back() -> None:
    metrics = ServingMetrics()
    requests, latency = metrics.answered("m", "1", "http")
    requests.inc()
    latency.observe(0.01)
    metrics.mark_loaded("m", "1", "current")
    metrics.retire("m", "1")
    # a request in flight at the swap, answered by version 1 after it retired
    requests, latency = metrics.answered("m", "1", "http")
    requests.inc()
    latency.observe(0.01)
    metrics.refused("m", "1", "http", "500", 0.01)
    page = generate_latest(metrics.registry).decode()
    assert 'version="1"' not in page
    # rolled back to: counted again
    metrics.mark_loaded("m", "1", "current")
    requests, _ = metrics.answered("m", "1", "http")
    requests.inc()
    page = generate_latest(metrics.registry).decode()
    assert (
        'mlbus_serve_requests_total{code="200",model="m",protocol="http",version="1"} 1.0' in page
    )
    check_metrics(page)
