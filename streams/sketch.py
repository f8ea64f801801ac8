"""Latency histogram of the stream processors: log-spaced buckets (DDSketch's mapping) whose
estimate is within ALPHA of the true value for every quantile, and which merge exactly, so
the hopping view is the sum of the tumbling windows it covers. Reads and writes no topic.

Why this over fixed Prometheus buckets or a t-digest: the relative error is guaranteed
(0.5 %, inside the 1 % the contract asks) whatever the latency range, the state is a sparse
dict of small ints that serializes to JSON for the faust changelog, and merging is adding
counts (a t-digest merge is approximate and order-dependent, which would break replay).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: Relative accuracy of every quantile estimate.
ALPHA = 0.005
GAMMA = (1 + ALPHA) / (1 - ALPHA)
#: 1 / ln(GAMMA): bucket_of's factor (streams/windows.py inlines bucket_of with it).
INV_LOG_GAMMA = 1.0 / math.log(GAMMA)
#: Latencies at or below this (1 µs) are counted as zero: below any real serving latency.
MIN_VALUE = 1e-6


def bucket_of(value: float) -> int | None:
    """Bucket index of a latency; None for the zero bucket."""
    if value <= MIN_VALUE:
        return None
    return math.ceil(math.log(value) * INV_LOG_GAMMA)


def bucket_value(index: int) -> float:
    """The estimate of bucket `index` (covers (GAMMA^(i-1), GAMMA^i]): within ALPHA of any
    value in it."""
    return 2.0 * GAMMA**index / (GAMMA + 1.0)


def quantiles(buckets: Mapping[int, int], zero: int, qs: Iterable[float]) -> dict[float, float]:
    """Estimates of the quantiles `qs` (0..1). The rank of quantile q among n values is
    floor(q * (n - 1)) (the "lower" method), the same in every figure mlbus reports."""
    n = zero + sum(buckets.values())
    out: dict[float, float] = {}
    if n == 0:
        return out
    wanted = sorted((math.floor(q * (n - 1)), q) for q in qs)
    ordered = sorted(buckets.items())
    cumulative = zero
    i = 0
    for rank, q in wanted:
        if rank < zero:
            out[q] = 0.0
            continue
        while cumulative <= rank and i < len(ordered):
            cumulative += ordered[i][1]
            i += 1
        out[q] = bucket_value(ordered[i - 1][0])
    return out


def merge_into(target: dict[int, int], source: Mapping[int, int]) -> None:
    for index, count in source.items():
        target[index] = target.get(index, 0) + count
