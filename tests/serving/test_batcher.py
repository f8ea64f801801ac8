"""Micro-batching on its own: concurrent requests share forward passes, each caller gets
its own rows back, an error reaches every caller of its batch, and a closed batcher still
answers the requests that reach it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.batcher import MicroBatcher


def _run(batcher: MicroBatcher, inputs: list[np.ndarray]) -> list[np.ndarray]:
    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(batcher.infer(x) for x in inputs))

    return asyncio.run(main())


def test_concurrent_requests_are_batched_and_split_back():
    sizes: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return x * 2

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(forward, max_batch_size=16, max_wait_us=50_000, executor=pool)
        inputs = [np.full((1 + i % 3, 4), i, dtype=np.float32) for i in range(20)]
        outputs = _run(batcher, inputs)
    for x, y in zip(inputs, outputs, strict=True):
        assert np.array_equal(y, x * 2)
    assert sum(sizes) == sum(len(x) for x in inputs)
    assert len(sizes) < len(inputs)  # shared forward passes
    # A batch is closed once it holds max_batch_size rows (one request may exceed it alone).
    assert max(sizes) <= 16 + 2


def test_an_error_reaches_every_caller_and_the_worker_goes_on():
    calls = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return x

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(forward, max_batch_size=64, max_wait_us=20_000, executor=pool)

        async def main() -> None:
            first = await asyncio.gather(*(batcher.infer(np.ones((1, 2))) for _ in range(3)),
                                         return_exceptions=True)  # fmt: skip
            assert all(isinstance(e, RuntimeError) for e in first)
            assert (await batcher.infer(np.ones((1, 2)))).shape == (1, 2)
            batcher.close()
            assert (await batcher.infer(np.ones((2, 2)))).shape == (2, 2)  # unbatched now

        asyncio.run(main())


def test_naive_mode_runs_one_forward_per_request():
    sizes: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        batcher = MicroBatcher(lambda x: sizes.append(len(x)) or x, max_batch_size=64,
                               max_wait_us=10_000, executor=pool, batching=False)  # fmt: skip
        _run(batcher, [np.ones((1, 3))] * 10)
    assert sizes == [1] * 10


@pytest.mark.parametrize("wait", [0, 1000])
def test_no_wait_or_short_wait_still_answers(wait):
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(lambda x: x + 1, max_batch_size=4, max_wait_us=wait, executor=pool)
        out = _run(batcher, [np.zeros((1, 1))] * 9)
    assert [float(o[0, 0]) for o in out] == [1.0] * 9
