"""Dynamic micro-batching: concurrent requests for one model version are queued on the
event loop, gathered into one batch (up to `max_batch_size` rows; under load, waiting at most
`max_wait_us` for more after the first), run in a worker thread so the event loop never
blocks on torch, and the result rows are handed back to each caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]
_CLOSE = None  # queue sentinel: drain what is before it, then stop


class MicroBatcher:
    """One per loaded version. `batching=False` is the naive server (one forward pass per
    request, in the thread pool), kept for the benchmark's baseline."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_size: int,
        max_wait_us: int,
        executor: Executor,
        batching: bool = True,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_us / 1e6
        self.executor = executor
        self.batching = batching
        # Created on first use: the queue and task belong to the loop that serves requests,
        # while a batcher is built on the deployer's thread.
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] | None
        self._queue = None
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._last_requests = 0
        self._closed = False

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """The forward pass's output rows for the input rows `x` (must be on the loop)."""
        loop = asyncio.get_running_loop()
        if not self.batching or self._closed:
            # Retired while a request that had already picked this version was on its way:
            # it still finishes on its version, unbatched.
            return await loop.run_in_executor(self.executor, self.forward, x)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._work(), name="mlbus-batcher")
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.put_nowait((x, future))
        self._wake()
        return await future

    def close(self) -> None:
        """Stop after the requests already queued (call on the loop, or before it runs)."""
        self._closed = True
        if self._queue is not None:
            self._queue.put_nowait(_CLOSE)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Until a request is queued or `seconds` pass. (Not `wait_for(queue.get())`: on
        Python 3.11 a timeout racing a delivery can lose the item.)"""
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, self._wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _work(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await queue.get()
            if first is _CLOSE:
                return
            batch = [first]
            rows = len(first[0])
            # Wait for company only under load (the last batch had several requests): a
            # lone client is not made to wait max_wait for requests that are not coming.
            deadline = loop.time() + (self.max_wait if self._last_requests > 1 else 0.0)
            while rows < self.max_batch_size:
                if queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    await self._wait(loop, remaining)
                    continue
                item = queue.get_nowait()
                if item is _CLOSE:
                    stopping = True
                    break
                batch.append(item)
                rows += len(item[0])
            self._last_requests = len(batch)
            await self._run(loop, batch)

    async def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]],
    ) -> None:
        x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
        try:
            out = await loop.run_in_executor(self.executor, self.forward, x)
        except Exception as e:  # every caller of the batch gets the error, the worker goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
            return
        start = 0
        for rows, future in batch:
            end = start + len(rows)
            if not future.done():  # a caller that went away (cancelled) is skipped
                future.set_result(out[start:end])
            start = end
