"""What every service's Prometheus registry holds besides its own figures: the process,
platform and garbage-collector collectors, the consumer lag of the process's consumer groups
(mlbus/kafka/lag.py) as `mlbus_consumer_lag{group,topic,partition}` and what its consumer
loops did with their records (`mlbus_consumer_records_total{group,outcome}`); and the small
HTTP server `mlbus run` gives the services that have no HTTP server of their own.
Reads and writes no topic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mlbus.kafka import lag, observed

log = logging.getLogger(__name__)


#: (group, topic, partition) → lag: what a consumer that is not librdkafka's reports (faust).
LagSource = Callable[[], Mapping[tuple[str, str, int], int]]


class LagCollector(Collector):
    """`mlbus_consumer_lag` from the statistics of this process's live group consumers, and
    from `extra` (a consumer that is not librdkafka's)."""

    def __init__(self, extra: LagSource | None = None) -> None:
        self.extra = extra

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mlbus_consumer_lag",
            "Records between a partition's high-water mark and the consumer group's committed "
            "offset, as this process's consumers see them",
            labels=("group", "topic", "partition"),
        )
        figures = dict(lag.snapshot())
        if self.extra is not None:
            figures.update(self.extra())
        for (group, topic, partition), value in sorted(figures.items()):
            family.add_metric((group, topic, str(partition)), value)
        yield family

    def describe(self) -> list[Any]:
        # Described without collecting: registration then reads no statistics.
        return [GaugeMetricFamily("mlbus_consumer_lag", "", labels=("group", "topic", "partition"))]


class LoopCollector(Collector):
    """`mlbus_consumer_records_total{group,outcome}`: what this process's consumer loops did
    with the records they read (mlbus/kafka/observed.py)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "mlbus_consumer_records",
            "Records this process's consumer loops handled, dead-lettered, wrote (positioned "
            "loops), skipped as already written, or retried",
            labels=("group", "outcome"),
        )
        for (group, outcome), value in sorted(observed.totals().items()):
            family.add_metric((group, outcome), value)
        yield family

    def describe(self) -> list[Any]:
        return [CounterMetricFamily("mlbus_consumer_records", "", labels=("group", "outcome"))]


def new_registry(lag_source: LagSource | None = None) -> CollectorRegistry:
    """A registry with the process (CPU, memory, file descriptors), platform (Python
    version) and GC collectors and the consumer lag: what every /metrics of mlbus exposes.
    One per server, so that two servers in one process (tests, benchmarks) do not collide."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(LagCollector(lag_source))
    registry.register(LoopCollector())
    return registry


_process_registry: CollectorRegistry | None = None
_process_lock = threading.Lock()


def process_registry() -> CollectorRegistry:
    """This process's registry, for a service whose figures are the collectors above."""
    global _process_registry
    with _process_lock:
        if _process_registry is None:
            _process_registry = new_registry()
        return _process_registry


def serve(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> bool:
    """Serve `registry` (default: `process_registry()`) at http://host:port/metrics in a
    daemon thread. False, logged, when the port is taken: the service runs on without
    metrics rather than die (several platforms on one host, tests running many services)."""
    try:
        start_http_server(port, addr=host, registry=registry or process_registry())
    except OSError as e:
        log.error("metrics: cannot listen on %s:%d (%s); /metrics is off", host, port, e)
        return False
    return True
