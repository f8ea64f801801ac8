"""The Prometheus view of the stream processors (prometheus-client, `/metrics` on
`streams.metrics_port`): the figures of every closed window, labelled by model and version.
Reads and writes no topic; fed by the window engine's callbacks.

Counters move when a window closes (not per record), so they agree with `serving.metrics`
and a redelivered record is never counted twice; latency is exposed as quantile gauges of
the last closed tumbling window (the sketch behind them is exact to 0.5 %), which a
fixed-bucket Prometheus histogram could not promise.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from mlbus.schemas.serving import ServingAlert, ServingMetrics

_MV = ("model", "version")


class Exporter:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.requests = Counter(
            "mlbus_serving_requests_total",
            "Logged inference requests in closed windows",
            _MV,
            registry=registry,
        )
        self.errors = Counter(
            "mlbus_serving_errors_total",
            "Failed inference requests in closed windows",
            _MV,
            registry=registry,
        )
        self.latency = Gauge(
            "mlbus_serving_latency_seconds",
            "Request latency quantile of the last closed tumbling window",
            (*_MV, "quantile"),
            registry=registry,
        )
        self.error_ratio = Gauge(
            "mlbus_serving_error_ratio",
            "Error rate of the last closed tumbling window",
            _MV,
            registry=registry,
        )
        self.psi = Gauge(
            "mlbus_serving_psi",
            "Population Stability Index against the training baseline, last closed window",
            (*_MV, "feature"),
            registry=registry,
        )
        self.late = Counter(
            "mlbus_serving_late_events_total",
            "Records that arrived after their window closed (beyond grace): not aggregated",
            _MV,
            registry=registry,
        )
        self.firing = Gauge(
            "mlbus_serving_alert_firing",
            "1 while an alert rule is firing",
            (*_MV, "alert"),
            registry=registry,
        )
        self.window_end = Gauge(
            "mlbus_serving_window_end_timestamp_seconds",
            "Event-time end of the last closed tumbling window",
            _MV,
            registry=registry,
        )
        self.deadletters = Counter(
            "mlbus_streams_deadletters_total",
            "inference.logged records dead-lettered",
            registry=registry,
        )
        self.records = Counter(
            "mlbus_streams_records_total",
            "inference.logged records processed",
            registry=registry,
        )

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    # -- engine callbacks --------------------------------------------------------------------

    def on_metrics(self, m: ServingMetrics) -> None:
        if m.window != "tumbling":
            return
        labels = (m.model, m.version)
        self.requests.labels(*labels).inc(m.requests)
        self.errors.labels(*labels).inc(m.errors)
        self.error_ratio.labels(*labels).set(m.error_rate)
        self.window_end.labels(*labels).set(m.window_end.timestamp())
        if m.latency_seconds is not None:
            q = m.latency_seconds
            for name, value in (("0.5", q.p50), ("0.95", q.p95), ("0.99", q.p99)):
                self.latency.labels(*labels, name).set(value)
        for feature, value in (m.psi or {}).items():
            self.psi.labels(*labels, feature).set(value)

    def on_alert(self, a: ServingAlert) -> None:
        self.firing.labels(a.model, a.version, a.alert).set(1 if a.status == "firing" else 0)

    def on_late(self, model: str, version: str) -> None:
        self.late.labels(model, version).inc()
