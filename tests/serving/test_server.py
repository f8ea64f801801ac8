"""The replica's process-level tuning: each forward thread gets its share of the cores for
torch (the batching worker all of them, the naive pool's threads one each when they are
more than the cores), set per thread so that two servers in one process keep their own; and
a GIL switch interval short enough for the forward thread to get the GIL back."""

from __future__ import annotations

import sys

import torch

from serving.server import SWITCH_INTERVAL, usable_cores
from tests.serving.conftest import running


def _forward_threads(srv) -> set[int]:
    futures = [srv.server.executor.submit(torch.get_num_threads) for _ in range(8)]
    return {f.result() for f in futures}


def test_forward_threads_share_the_cores_and_keep_their_own_count(kafka, store):
    cores = usable_cores()
    with running(kafka, store) as batching, running(kafka, store, batching=False) as naive:
        assert batching.server.torch_threads == cores
        pool = naive.server.forward_workers
        assert naive.server.torch_threads == max(1, cores // pool)
        # Interleaved: neither server's setting leaks into the other's threads.
        assert _forward_threads(batching) == {cores}
        assert _forward_threads(naive) == {naive.server.torch_threads}
        assert _forward_threads(batching) == {cores}
        assert sys.getswitchinterval() <= SWITCH_INTERVAL
    with running(kafka, store, torch_threads=1) as srv:
        assert _forward_threads(srv) == {1}


def test_the_torch_threads_setting_overrides_the_automatic_share(kafka, store):
    from mlbus.settings import ServingSettings
    from serving.server import ModelServer

    server = ModelServer(kafka, store, ServingSettings(torch_threads=3), stream_group=None)
    try:
        assert server.torch_threads == 3
        assert server.executor.submit(torch.get_num_threads).result() == 3
    finally:
        server.stop()
