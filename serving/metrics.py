"""Prometheus metrics of one serving replica, on their own registry (so that two servers in
one process, as in tests and benchmarks, do not collide); exposed at `/metrics` with the
process, platform and GC collectors and the consumer lag of stream inference's group.

Every request is counted once in `mlbus_serve_requests_total{model,version,protocol,code}`
and observed once in the latency histogram of the same model, version and protocol, so that
the two agree; `code` is the HTTP status the request got (a Kafka request's answer gets the
status an HTTP request would have had). The series of a version leave the registry when the
version retires (unloaded, or pushed out by later promotions): a dashboard never shows a
retired version's last figures as current.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from mlbus.metrics import new_registry

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Label value for requests naming a model this replica does not serve (bounded cardinality).
UNKNOWN = "_unknown"
#: Version label of a request refused before a version was chosen (bad body, not found).
NO_VERSION = ""
OK = "200"


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.requests = Counter(
            "mlbus_serve_requests",
            "inference requests, answered or refused, by the HTTP status they got",
            ["model", "version", "protocol", "code"],
            registry=r,
        )
        self.errors = Counter(
            "mlbus_serve_errors",
            "inference requests refused or failed, by reason (the error class)",
            ["model", "protocol", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "mlbus_serve_request_latency_seconds",
            "request latency, body read to response, of every request counted in "
            "mlbus_serve_requests_total",
            ["model", "version", "protocol"],
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
            "1 for each loaded version; role current|previous|candidate (a rollout's)",
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
        self.shadow_dropped = Counter(
            "mlbus_serve_shadow_dropped",
            "copies of requests not sent to a shadow candidate: too many already in flight",
            registry=r,
        )
        # The label sets of each (model, version), so that its retirement removes them all;
        # and the children of answered requests, looked up once (`labels()` validates and
        # locks on every call; this is every request's path).
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], set[tuple[Any, tuple[str, ...]]]] = {}
        self._answered: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        # Retired versions: a request still in flight at the swap, answered by one after its
        # series were removed, must not bring them back for good.
        self._retired: set[tuple[str, str]] = set()

    def _child(self, metric: Any, model: str, version: str, *rest: str) -> Any:
        labels = (model, version, *rest)
        with self._lock:
            if (model, version) in self._retired:
                return _NOWHERE
            self._series.setdefault((model, version), set()).add((metric, labels))
        return metric.labels(*labels)

    def answered(self, model: str, version: str, protocol: str) -> tuple[Any, Any]:
        """The 200 counter and the latency histogram of a version and protocol."""
        key = (model, version, protocol)
        children = self._answered.get(key)
        if children is None:
            children = (
                self._child(self.requests, model, version, protocol, OK),
                self._child(self.latency, model, version, protocol),
            )
            if children[0] is not _NOWHERE:  # a retired version's is looked up each time
                self._answered[key] = children
        return children

    def refused(self, model: str, version: str, protocol: str, code: str, latency: float) -> None:
        self._child(self.requests, model, version, protocol, code).inc()
        self._child(self.latency, model, version, protocol).observe(latency)

    def batch(self, model: str, version: str, rows: int) -> None:
        self._child(self.batch_size, model, version).observe(rows)

    def mark_loaded(self, model: str, version: str, role: str) -> None:
        with self._lock:
            self._retired.discard((model, version))  # loaded again (a rollback)
        self._child(self.loaded, model, version, role).set(1)

    def unmark_loaded(self, model: str, version: str, role: str) -> None:
        with contextlib.suppress(KeyError):
            self.loaded.remove(model, version, role)

    def retire(self, model: str, version: str) -> None:
        """Remove every series of a version this replica no longer serves."""
        with self._lock:
            self._retired.add((model, version))
            series = self._series.pop((model, version), set())
            for key in [k for k in self._answered if k[:2] == (model, version)]:
                del self._answered[key]
        for metric, labels in series:
            with contextlib.suppress(KeyError):  # already removed (a role change)
                metric.remove(*labels)


class _Nowhere:
    """Where the figures of a retired version's stragglers go."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass

    def set(self, value: float) -> None:
        pass


_NOWHERE = _Nowhere()
