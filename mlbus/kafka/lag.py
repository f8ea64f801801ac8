"""Consumer lag of this process's consumer groups, per topic and partition, taken from
librdkafka's statistics (`statistics.interval.ms`; `KafkaConfig.consumer` installs `record` as
the callback of every group consumer). Each service's `/metrics` exposes it (mlbus/metrics.py).
Reads and writes no topic.

The lag is librdkafka's own figure: the partition's high-water mark, as the last fetch
response carried it, minus the group's committed offset (`consumer_lag`); before the group
has committed anything on a partition, minus the consumer's stored position instead
(`consumer_lag_stored`), and before it has read anything there, minus the partition's log
start (the consumers start from the earliest offset: all of it is still to read). Fetch
responses carry a correct high-water mark on the embedded broker too, where a ListOffsets
"latest" does not (docs/broker.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import orjson

log = logging.getLogger(__name__)

#: A consumer whose statistics are older than this many intervals is gone (closed or stuck
#: outside poll()); its partitions leave the figures rather than keep their last lag forever.
STALE_INTERVALS = 3


@dataclass(frozen=True)
class _Report:
    at: float
    group: str
    stale_after: float
    lags: dict[tuple[str, int], int]


_lock = threading.Lock()
_reports: dict[str, _Report] = {}  # librdkafka client name → its last statistics


def record(group: str, interval_ms: int, stats: str) -> None:
    """librdkafka's `stats_cb` (called from the consumer's poll) for a consumer of `group`."""
    try:
        doc = orjson.loads(stats)
    except orjson.JSONDecodeError:  # never let a statistics glitch reach the consumer loop
        log.warning("consumer statistics of group %s are not JSON; lag not updated", group)
        return
    lags: dict[tuple[str, int], int] = {}
    for topic, t in (doc.get("topics") or {}).items():
        for key, p in (t.get("partitions") or {}).items():
            partition = int(key)
            # -1 is librdkafka's internal "unassigned" partition; a partition this consumer
            # does not fetch (not assigned to it) has no lag of its.
            if partition < 0 or p.get("fetch_state") in (None, "none", "stopped"):
                continue
            lag = p.get("consumer_lag", -1)
            if lag < 0:
                lag = p.get("consumer_lag_stored", -1)
            if lag < 0:  # nothing committed or read yet: all of it is to read (earliest)
                high, low = p.get("hi_offset", -1), p.get("lo_offset", -1)
                lag = high - low if high >= 0 and low >= 0 else -1
            if lag >= 0:
                lags[(topic, partition)] = lag
    stale = max(STALE_INTERVALS * interval_ms / 1000, 15.0)
    with _lock:
        _reports[str(doc.get("name", ""))] = _Report(time.monotonic(), group, stale, lags)


def snapshot() -> dict[tuple[str, str, int], int]:
    """(group, topic, partition) → lag, from every live consumer of this process."""
    now = time.monotonic()
    out: dict[tuple[str, str, int], int] = {}
    with _lock:
        for name, report in list(_reports.items()):
            if now - report.at > report.stale_after:
                del _reports[name]
                continue
            for (topic, partition), lag in report.lags.items():
                key = (report.group, topic, partition)
                # Two consumers of one group in one process own different partitions; during
                # a handover both may report one: the larger lag is the honest figure.
                out[key] = max(lag, out.get(key, lag))
    return out
