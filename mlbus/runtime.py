"""Facts about the process a component runs in, shared by the components that size their
work to it (the model server's forward threads, the lineage rebuild's writer process)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
