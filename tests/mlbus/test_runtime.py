"""`steady_allocations`: freed memory stays in a training process, and goes back after."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlbus.runtime import _glibc

pytestmark = pytest.mark.unit

# Run in a fresh interpreter: the allocator's thresholds are process-wide and sticky.
PROBE = """
import json, resource
import numpy as np
from mlbus.runtime import steady_allocations

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):  # a training step's pattern: multi-MB buffers made and freed
        a = np.ones(3_000_000, dtype=np.float32)
        b = np.ones(3_000_000, dtype=np.float32)
        c = np.ones(3_000_000, dtype=np.float32)
        del a, b, c  # 36 MB free at the heap's top: glibc trims it, the next step faults
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

with steady_allocations():
    with steady_allocations():  # nested: the outer one still holds
        faults()
    inside = faults()
    held = [np.ones(2_000_000, dtype=np.float32) for _ in range(40)]  # 320 MB in 8 MB blocks
    del held
    kept = rss_mb()
released = rss_mb()
print(json.dumps({"inside": inside, "after": faults(), "kept": kept, "released": released}))
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt: Linux only")
def test_training_buffers_stay_in_the_process_and_go_back_after() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    figures = json.loads(out.stdout)
    # 30 rounds of 36 MB allocated: ~260,000 page faults if each block were mapped afresh.
    assert figures["inside"] < 1_000, figures
    assert figures["after"] < 20_000, figures  # adaptive again: not one fault per page
    # The 320 MB freed inside stayed resident; leaving gave it back.
    assert figures["kept"] - figures["released"] > 200, figures
