"""The replica's process-level tuning: each forward thread gets its share of the cores for
torch (the batching server's PIPELINE threads an equal share: one thread, every core; the
naive pool's threads one each when they are more than the cores), set per thread so that
two servers in one process keep their own; a GIL switch interval short enough for a forward
thread to get the GIL back; and a garbage collector that does not walk the whole heap every
few requests."""

from __future__ import annotations

import gc
import sys

import torch

from mlbus.runtime import usable_cores
from mlbus.serving.server import GC_THRESHOLD, PIPELINE, SWITCH_INTERVAL, tune_gc
from tests.serving.conftest import running


def _forward_threads(srv) -> set[int]:
    futures = [srv.server.executor.submit(torch.get_num_threads) for _ in range(8)]
    return {f.result() for f in futures}


def test_forward_threads_share_the_cores_and_keep_their_own_count(kafka, store):
    cores = usable_cores()
    with running(kafka, store) as batching, running(kafka, store, batching=False) as naive:
        share = max(1, cores // PIPELINE)
        assert (batching.server.forward_workers, batching.server.torch_threads) == (PIPELINE, share)
        pool = naive.server.forward_workers
        assert naive.server.torch_threads == max(1, cores // pool)
        # Interleaved: neither server's setting leaks into the other's threads.
        assert _forward_threads(batching) == {share}
        assert _forward_threads(naive) == {naive.server.torch_threads}
        assert _forward_threads(batching) == {share}
        assert sys.getswitchinterval() <= SWITCH_INTERVAL
    with running(kafka, store, torch_threads=1) as srv:
        assert _forward_threads(srv) == {1}


def test_the_torch_threads_setting_overrides_the_automatic_share(kafka, store):
    from mlbus.serving.server import ModelServer
    from mlbus.settings import ServingSettings

    server = ModelServer(kafka, store, ServingSettings(torch_threads=3), stream_group=None)
    try:
        assert server.torch_threads == 3
        assert server.executor.submit(torch.get_num_threads).result() == 3
    finally:
        server.stop()


def test_the_collector_threshold_is_raised_never_lowered_and_off_stays_off():
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, *saved[1:])
        tune_gc()
        assert gc.get_threshold()[0] == GC_THRESHOLD
        gc.set_threshold(GC_THRESHOLD * 2, *saved[1:])
        tune_gc()
        assert gc.get_threshold()[0] == GC_THRESHOLD * 2
        gc.set_threshold(0, *saved[1:])  # automatic collection switched off by the operator
        tune_gc()
        assert gc.get_threshold()[0] == 0
        assert gc.get_freeze_count() > 0  # what existed at the first server's start
    finally:
        gc.set_threshold(*saved)
