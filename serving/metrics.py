"""Prometheus metrics of one serving replica, on their own registry (so that two servers in
one process, as in tests and benchmarks, do not collide); exposed at `/metrics`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Label value for requests naming a model this replica does not serve (bounded cardinality).
UNKNOWN = "_unknown"


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlbus_serve_requests",
            "inference requests answered",
            ["model", "version", "protocol"],
            registry=r,
        )
        self.errors = Counter(
            "mlbus_serve_errors",
            "inference requests refused or failed",
            ["model", "protocol", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "mlbus_serve_request_latency_seconds",
            "request latency, body read to response",
            ["model", "protocol"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mlbus_serve_batch_size",
            "rows per forward pass (after micro-batching)",
            ["model", "version"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.loaded = Gauge(
            "mlbus_serve_model_loaded",
            "1 for each loaded version; role current|previous",
            ["model", "version", "role"],
            registry=r,
        )
        self.deployments = Counter(
            "mlbus_serve_deployments",
            "version loads by outcome",
            ["model", "status"],
            registry=r,
        )
        self.log_published = Counter(
            "mlbus_serve_inference_log_published",
            "inference.logged records produced",
            registry=r,
        )
        self.log_dropped = Counter(
            "mlbus_serve_inference_log_dropped",
            "inference.logged samples dropped because the log queue was full",
            registry=r,
        )
