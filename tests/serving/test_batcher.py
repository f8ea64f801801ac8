"""Micro-batching on its own: concurrent requests share forward passes, each caller gets
its own rows back, an error reaches every caller of its batch, and a closed batcher still
answers the requests that reach it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mlbus.serving.batcher import MicroBatcher
from mlbus.serving.errors import NotReady


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
            first = await asyncio.gather(
                *(batcher.infer(np.ones((1, 2))) for _ in range(3)), return_exceptions=True
            )
            assert all(isinstance(e, RuntimeError) for e in first)
            assert (await batcher.infer(np.ones((1, 2)))).shape == (1, 2)
            batcher.close()
            assert (await batcher.infer(np.ones((2, 2)))).shape == (2, 2)  # unbatched now

        asyncio.run(main())


def test_naive_mode_runs_one_forward_per_request():
    sizes: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        batcher = MicroBatcher(
            lambda x: sizes.append(len(x)) or x,
            max_batch_size=64,
            max_wait_us=10_000,
            executor=pool,
            batching=False,
        )
        _run(batcher, [np.ones((1, 3))] * 10)
    assert sizes == [1] * 10


@pytest.mark.parametrize("wait", [0, 1000])
def test_no_wait_or_short_wait_still_answers(wait):
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(lambda x: x + 1, max_batch_size=4, max_wait_us=wait, executor=pool)
        out = _run(batcher, [np.zeros((1, 1))] * 9)
    assert [float(o[0, 0]) for o in out] == [1.0] * 9


# -- batches in flight (max_in_flight > 1) -------------------------------------------------


class _Gate:
    """A forward that records its batches and blocks every call until `release()` (or, with
    `meet`, until that many calls are inside at once: the proof that they run together)."""

    def __init__(self, meet: int = 0) -> None:
        self.sizes: list[int] = []
        self.inside = 0
        self.most_inside = 0
        self.entered = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._meet = threading.Barrier(meet, timeout=HANG) if meet else None

    def release(self) -> None:
        self._open.set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            self.sizes.append(len(x))
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        self.entered.release()
        try:
            if self._meet is not None:
                self._meet.wait()  # BrokenBarrierError unless the others come in meanwhile
            elif not self._open.wait(HANG):
                raise TimeoutError("never released")
            return x * 2
        finally:
            with self._lock:
                self.inside -= 1


#: How long a test waits before it calls a blocked forward or an unanswered caller hung:
#: a guard against hanging the suite, not a timing assertion.
HANG = 30.0


async def _entered(gate: _Gate, n: int) -> None:
    """Until `n` forward calls have begun."""
    for _ in range(n):
        await asyncio.to_thread(gate.entered.acquire, True, HANG)


def test_batches_run_concurrently_up_to_max_in_flight():
    gate = _Gate(meet=2)  # each forward waits for the other: one at a time would deadlock
    with ThreadPoolExecutor(4) as pool:
        batcher = MicroBatcher(
            gate, max_batch_size=4, max_wait_us=0, executor=pool, max_in_flight=2
        )
        inputs = [np.full((1, 3), i, dtype=np.float32) for i in range(8)]
        outputs = _run(batcher, inputs)
    for x, y in zip(inputs, outputs, strict=True):
        assert np.array_equal(y, x * 2)
    assert gate.most_inside == 2  # never more than max_in_flight, though the pool has 4
    assert sum(gate.sizes) == 8


def test_a_batch_takes_at_most_its_share_of_max_batch_size():
    sizes: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return x + 1

    with ThreadPoolExecutor(2) as pool:
        # Share: 8 rows / 2 batches in flight = 4 rows a batch.
        batcher = MicroBatcher(
            forward, max_batch_size=8, max_wait_us=20_000, executor=pool, max_in_flight=2
        )
        inputs = [np.full((1 + i % 3, 2), i, dtype=np.float32) for i in range(30)]
        big = np.arange(12, dtype=np.float32).reshape(6, 2)  # larger than a share alone
        inputs.append(big)
        outputs = _run(batcher, inputs)
    for x, y in zip(inputs, outputs, strict=True):
        assert np.array_equal(y, x + 1)  # the split request's rows come back in order
    assert sum(sizes) == sum(len(x) for x in inputs)
    assert max(sizes) <= 4  # the big one was split into chunks of at most a share
    assert len(sizes) < len(inputs)  # still batched


def test_an_error_reaches_the_callers_of_its_batch_only():
    def forward(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise RuntimeError("boom")
        return x

    with ThreadPoolExecutor(2) as pool:
        batcher = MicroBatcher(
            forward, max_batch_size=4, max_wait_us=0, executor=pool, max_in_flight=2
        )

        async def main() -> list[object]:
            # Queued at once: [-1, 1] is the first batch (a share: 2 rows), [2, 3] the second.
            rows = [np.full((1, 1), v) for v in (-1.0, 1.0, 2.0, 3.0)]
            return await asyncio.gather(*(batcher.infer(x) for x in rows), return_exceptions=True)

        first, second, third, fourth = asyncio.run(main())
    assert isinstance(first, RuntimeError) and isinstance(second, RuntimeError)
    assert float(third[0, 0]) == 2.0 and float(fourth[0, 0]) == 3.0


def test_close_with_batches_in_flight_still_answers_every_caller():
    gate = _Gate()
    with ThreadPoolExecutor(2) as pool:
        batcher = MicroBatcher(
            gate, max_batch_size=4, max_wait_us=0, executor=pool, max_in_flight=2
        )

        async def main() -> tuple[list[np.ndarray], list[np.ndarray]]:
            rows = [np.full((1, 2), i, dtype=np.float32) for i in range(10)]
            running = [asyncio.ensure_future(batcher.infer(x)) for x in rows[:4]]
            await _entered(gate, 2)  # two batches in flight, both threads busy
            queued = [asyncio.ensure_future(batcher.infer(x)) for x in rows[4:]]
            await asyncio.sleep(0)  # queued behind the batches in flight
            batcher.close()
            late = asyncio.ensure_future(batcher.infer(np.full((1, 2), 10, dtype=np.float32)))
            gate.release()
            answers = await asyncio.wait_for(asyncio.gather(*running, *queued, late), HANG)
            assert batcher._task is not None
            await asyncio.wait_for(batcher._task, HANG)  # the worker stopped after draining
            return [*rows, np.full((1, 2), 10, dtype=np.float32)], answers

        inputs, outputs = asyncio.run(main())
    for x, y in zip(inputs, outputs, strict=True):
        assert np.array_equal(y, x * 2)
    # The six queued before close() were still batched (shares of 2); the late one alone.
    assert sorted(gate.sizes) == [1, 2, 2, 2, 2, 2]


def test_an_executor_shut_down_under_queued_batches_answers_not_ready():
    gate = _Gate()
    pool = ThreadPoolExecutor(1)  # one thread: the second batch in flight waits in the pool
    batcher = MicroBatcher(gate, max_batch_size=2, max_wait_us=0, executor=pool, max_in_flight=2)

    async def main() -> list[object]:
        rows = [np.full((1, 1), float(i)) for i in range(6)]
        calls = [asyncio.ensure_future(batcher.infer(x)) for x in rows]
        await _entered(gate, 1)
        await asyncio.sleep(0)
        pool.shutdown(wait=False, cancel_futures=True)  # as ModelServer.stop does
        gate.release()
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), HANG)

    answers = asyncio.run(main())
    pool.shutdown(wait=True)
    assert [float(a[0, 0]) for a in answers[:1]] == [0.0]  # the batch that was running
    assert all(isinstance(a, NotReady) for a in answers[1:]), answers


def test_a_forward_that_answers_the_wrong_rows_fails_its_callers_not_the_worker():
    calls: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x[:1] if len(calls) == 1 else x  # the first batch loses rows

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(forward, max_batch_size=8, max_wait_us=0, executor=pool)

        async def main() -> None:
            first = await asyncio.wait_for(
                asyncio.gather(
                    *(batcher.infer(np.ones((1, 2))) for _ in range(3)), return_exceptions=True
                ),
                HANG,
            )
            assert all(isinstance(e, RuntimeError) for e in first), first
            assert (await asyncio.wait_for(batcher.infer(np.ones((2, 2))), HANG)).shape == (2, 2)

        asyncio.run(main())


def test_a_large_request_is_split_and_a_small_one_rides_in_the_next_batch():
    """One request of 40 rows (max batch 4) and, once its first chunk is in the forward
    pass, a one-row request: the small one is answered in the second batch, long before the
    large one's last chunk, and the large one gets its 40 rows back in order."""
    batches: list[list[float]] = []
    first_running = threading.Event()
    release = threading.Event()

    def forward(x: np.ndarray) -> np.ndarray:
        batches.append(x[:, 0].tolist())
        if len(batches) == 1:
            first_running.set()
            release.wait(10)
        return x * 2

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(forward, max_batch_size=4, max_wait_us=0, executor=pool)
        large = np.arange(40, dtype=np.float32).reshape(40, 1)
        small = np.full((1, 1), -1.0, dtype=np.float32)
        answered: list[str] = []

        async def main() -> tuple[np.ndarray, np.ndarray]:
            async def ask(name: str, x: np.ndarray) -> np.ndarray:
                out = await batcher.infer(x)
                answered.append(name)
                return out

            big = asyncio.ensure_future(ask("large", large))
            await asyncio.get_running_loop().run_in_executor(None, first_running.wait, 10)
            one = asyncio.ensure_future(ask("small", small))
            await asyncio.sleep(0.05)  # queued while the first chunk is in its forward pass
            release.set()
            return await big, await one

        big_out, small_out = asyncio.run(main())
    assert np.array_equal(big_out, large * 2) and np.array_equal(small_out, small * 2)
    assert answered == ["small", "large"]
    assert all(len(b) <= 4 for b in batches) and len(batches) == 11
    # The small request rode in the batch right after the one in flight.
    assert -1.0 in batches[1]
    assert [v for b in batches for v in b if v >= 0] == list(range(40))


def test_a_cancelled_large_request_drops_its_remaining_chunks():
    sizes: list[int] = []

    def forward(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return x

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(forward, max_batch_size=2, max_wait_us=0, executor=pool)

        async def main() -> np.ndarray:
            big = asyncio.ensure_future(batcher.infer(np.ones((1000, 1))))
            await asyncio.sleep(0.01)
            big.cancel()
            return await batcher.infer(np.ones((1, 1)))

        assert asyncio.run(main()).shape == (1, 1)
    assert sum(sizes) < 1000


def test_a_stream_of_small_requests_does_not_starve_a_large_one():
    """Small requests filling whole batches still leave a split request every other batch."""
    batches: list[list[float]] = []

    def forward(x: np.ndarray) -> np.ndarray:
        batches.append(x[:, 0].tolist())
        return x

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(forward, max_batch_size=2, max_wait_us=0, executor=pool)
        answered: list[str] = []

        async def ask(name: str, x: np.ndarray) -> None:
            await batcher.infer(x)
            answered.append(name)

        async def main() -> None:
            large = ask("large", np.arange(20, dtype=np.float32).reshape(20, 1))
            small = [ask(f"small{i}", np.full((2, 1), -1.0)) for i in range(30)]
            await asyncio.gather(large, *small)

        asyncio.run(main())
    assert answered.index("large") < 25  # 10 chunks, one every other batch
    assert all(len(b) <= 2 for b in batches)
