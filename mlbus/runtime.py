"""Facts about the process a component runs in, shared by the components that size their
work to it (the model server's forward threads, the lineage rebuild's writer process), and
how a training process has its memory allocated (`steady_allocations`)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap, never a fresh mmap (glibc's largest allowed
#: mmap threshold on 64-bit, where its own dynamic threshold tops out too).
_MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the heap's top kept while training, and after (twice the mmap threshold,
#: as glibc's dynamic rule would set it).
_TRAINING_TRIM, _IDLE_TRIM = 1024 * 1024 * 1024, 64 * 1024 * 1024

_allocations_lock = threading.Lock()
_allocations_users = 0


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt  # noqa: B018 - absent on musl: then nothing is tuned
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def steady_allocations() -> Iterator[None]:
    """Keep freed memory in the process while training, and give it back after.

    A training step allocates the same large activation and gradient buffers every time
    (megabytes each). glibc hands such blocks out as fresh mmaps, or trims the heap's free
    top above a threshold, so every step returned them to the kernel and faulted them in
    again, zeroed: thousands of page faults a step, a tenth of the run's CPU spent in the
    kernel, and two training processes side by side (a data-parallel run) slowed more than
    one alone, since zeroing pages is memory bandwidth they share (bench/distributed.py
    measures it: bench/results/distributed.txt). Inside this
    context blocks up to 32 MiB come from the heap and freed memory stays (up to 1 GiB);
    on leaving the last one, the free memory is returned (malloc_trim), so an idle worker
    does not hold its last run's peak, and the heap keeps at most 64 MiB free from then on
    (what glibc's own adaptive thresholds settle at; a threshold set by mallopt turns that
    adaptation off for good, so the defaults would not come back by setting them again).
    Nests and may be entered from several threads; on a C library without mallopt it does
    nothing."""
    global _allocations_users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _allocations_lock:
        _allocations_users += 1
        if _allocations_users == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _TRAINING_TRIM)
    try:
        yield
    finally:
        with _allocations_lock:
            _allocations_users -= 1
            if _allocations_users == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _IDLE_TRIM)
                libc.malloc_trim(0)
