"""The Prometheus view of the stream processors (prometheus-client, `/metrics` on
`streams.metrics_port`): the figures of every closed window, labelled by model and version,
beside the process, platform and GC collectors and the app's consumer lag. Reads and writes
no topic; fed by the window engine's callbacks.

Counters move when a window closes (not per record), so they agree with `serving.metrics`
and a redelivered record is never counted twice. They count the *logged* requests (the
inference log is a sample, `serving.log_sample_rate`); the model server's own
`mlbus_serve_requests_total` counts every request. Latency is exposed as gauges of the last
closed tumbling window's quantiles (label `q`; the sketch behind them is exact to 0.5 %),
which a fixed-bucket Prometheus histogram could not promise; they are plain gauges, not a
summary, because a window's quantiles come with no running sum. The series of a retired
version (neither of its model's last two promotions, as the model server keeps them) are
removed, and a replayed window of one does not bring them back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from mlbus.metrics import LagSource, new_registry
from mlbus.schemas.serving import ServingAlert, ServingMetrics

_MV = ("model", "version")


def _never(model: str, version: str) -> bool:
    return False


class Exporter:
    """`retired(model, version)` says whether a version is retired; `lag` adds the app's
    consumer lag to `mlbus_consumer_lag`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        retired: Callable[[str, str], bool] = _never,
        lag: LagSource | None = None,
    ) -> None:
        self.registry = registry = registry or new_registry(lag)
        self._retired = retired
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], set[tuple[Any, tuple[str, ...]]]] = {}
        self.requests = Counter(
            "mlbus_serving_logged_requests_total",
            "Logged (sampled) inference requests in closed windows",
            _MV,
            registry=registry,
        )
        self.errors = Counter(
            "mlbus_serving_logged_errors_total",
            "Logged (sampled) failed inference requests in closed windows",
            _MV,
            registry=registry,
        )
        self.latency = Gauge(
            "mlbus_serving_window_latency_seconds",
            "Request latency quantile q of the last closed tumbling window",
            (*_MV, "q"),
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

    # -- series of a version ------------------------------------------------------------------

    def _child(self, metric: Any, model: str, version: str, *rest: str) -> Any:
        labels = (model, version, *rest)
        with self._lock:
            self._series.setdefault((model, version), set()).add((metric, labels))
        return metric.labels(*labels)

    def sweep(self, model: str) -> None:
        """Remove the series of `model`'s versions that are retired now (called on each of
        its promotions)."""
        with self._lock:
            gone = [key for key in self._series if key[0] == model and self._retired(*key)]
            series = [s for key in gone for s in self._series.pop(key)]
        for metric, labels in series:
            with contextlib.suppress(KeyError):
                metric.remove(*labels)

    # -- engine callbacks --------------------------------------------------------------------

    def on_metrics(self, m: ServingMetrics) -> None:
        if m.window != "tumbling" or self._retired(m.model, m.version):
            return
        mv = (m.model, m.version)
        self._child(self.requests, *mv).inc(m.requests)
        self._child(self.errors, *mv).inc(m.errors)
        self._child(self.error_ratio, *mv).set(m.error_rate)
        self._child(self.window_end, *mv).set(m.window_end.timestamp())
        if m.latency_seconds is not None:
            q = m.latency_seconds
            for name, value in (("0.5", q.p50), ("0.95", q.p95), ("0.99", q.p99)):
                self._child(self.latency, *mv, name).set(value)
        for feature, value in (m.psi or {}).items():
            self._child(self.psi, *mv, feature).set(value)

    def on_alert(self, a: ServingAlert) -> None:
        if self._retired(a.model, a.version):
            return
        firing = 1 if a.status == "firing" else 0
        self._child(self.firing, a.model, a.version, a.alert).set(firing)

    def on_late(self, model: str, version: str) -> None:
        if not self._retired(model, version):
            self._child(self.late, model, version).inc()
