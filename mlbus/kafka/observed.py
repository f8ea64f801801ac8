"""The consumer loops of this process, each with its group and its counts (`stats`), for
/metrics (mlbus/metrics.py: `mlbus_consumer_records_total`, `mlbus_consumer_retries_total`).
A loop registers itself when it is made and leaves when it is garbage. Reads no topic."""

from __future__ import annotations

import threading
import weakref
from typing import Any

_lock = threading.Lock()
_loops: weakref.WeakSet[Any] = weakref.WeakSet()


def watch(loop: Any) -> None:
    """Count `loop` (a ConsumerLoop or a PositionedConsumer: `group` and `stats`)."""
    with _lock:
        _loops.add(loop)


def totals() -> dict[tuple[str, str], int]:
    """(group, outcome) → records, summed over this process's loops; outcome `retried` counts
    retries (of a record, or of a batch's write)."""
    with _lock:
        loops = list(_loops)
    out: dict[tuple[str, str], int] = {}
    for loop in loops:
        stats = loop.stats
        for outcome, field in _OUTCOMES:
            value = getattr(stats, field, None)
            if value is not None:
                key = (loop.group, outcome)
                out[key] = out.get(key, 0) + value
    return out


#: (outcome label, stats field): ConsumerLoop's LoopStats and PositionedConsumer's
#: PositionedStats name them differently.
_OUTCOMES = (
    ("handled", "handled"),
    ("deadlettered", "deadlettered"),
    ("written", "records"),
    ("skipped", "skipped"),
    ("retried", "retries"),
)
