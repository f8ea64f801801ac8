"""Dynamic micro-batching: concurrent requests for one model version are queued on the
event loop, gathered into one batch (up to `max_batch_size` rows; under load, waiting at most
`max_wait_us` for more after the first), run in a worker thread so the event loop never
blocks on torch, and the result rows are handed back to each caller.

Up to `max_in_flight` batches may run at once (one per forward thread; the server runs one,
see serving.server.PIPELINE): while one batch is in its forward pass, the next one gathers,
its requests parsed and decoded by the event loop, and starts as soon as a thread is free.
A batch then takes at most its share of `max_batch_size` (divided among the batches in
flight; a request that would overfill it opens the next batch, and only a request larger
than the share alone makes a larger batch): otherwise a burst of requests (every client
answered at once comes back at once) all joins one batch and the other forward thread has
nothing to do.

Every caller hears back: its rows, the error of its batch's forward pass, or `NotReady` when
the executor is shut down under a queued batch. `close()` stops gathering after the
requests queued before it; batches already in flight still answer their callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from mlbus.serving.errors import NotReady

Forward = Callable[[np.ndarray], np.ndarray]
#: Queued requests: the input rows and the future their caller awaits.
Batch = list[tuple[np.ndarray, "asyncio.Future[np.ndarray]"]]
_CLOSE = None  # queue sentinel: drain what is before it, then stop


class MicroBatcher:
    """One per loaded version. `batching=False` is the naive server (one forward pass per
    request, in the thread pool), kept for the benchmark's baseline. `max_in_flight`: the
    batches that may run at once (the executor's threads for forward passes)."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch_size: int,
        max_wait_us: int,
        executor: Executor,
        batching: bool = True,
        max_in_flight: int = 1,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_us / 1e6
        self.executor = executor
        self.batching = batching
        self.max_in_flight = max(1, max_in_flight)
        # The most rows one batch takes: each forward thread's share of max_batch_size.
        self.share = -(-max_batch_size // self.max_in_flight)
        # Created on first use: the queue and task belong to the loop that serves requests,
        # while a batcher is built on the deployer's thread.
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None] | None
        self._queue = None
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._slot: asyncio.Future[None] | None = None  # awaited while every thread is busy
        self._in_flight = 0
        # A request that did not fit in the last batch's share: the next batch's first.
        self._carried: tuple[np.ndarray, asyncio.Future[np.ndarray]] | None = None
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
            if self._in_flight >= self.max_in_flight:  # gather once a forward thread is free
                # No wakeup is lost: `_answer` runs on this loop, so it cannot run between
                # the check and the await, and it resolves the slot it finds.
                self._slot = loop.create_future()
                await self._slot
                continue
            first, self._carried = self._carried, None
            if first is None:
                first = await queue.get()
            if first is _CLOSE:
                break
            batch = [first]
            rows = len(first[0])
            # Wait for company only under load (the last batch had several requests): a
            # lone client is not made to wait max_wait for requests that are not coming.
            deadline = loop.time() + (self.max_wait if self._last_requests > 1 else 0.0)
            while rows < self.share:
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
                if rows + len(item[0]) > self.share:  # over the share: it opens the next one
                    self._carried = item
                    break
                batch.append(item)
                rows += len(item[0])
            self._last_requests = len(batch)
            self._start(loop, batch)
        # Batches still in flight are answered by `_answer` (a callback, not this task).

    def _start(self, loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        """Run a batch's forward pass in the executor; `_answer` hands out its rows (a
        callback rather than a task per batch: a lone client's request pays for no more
        than the executor's round trip)."""
        try:
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
        except Exception as e:  # rows that do not stack: the callers hear it
            _fail(batch, e)
            return
        try:
            done = loop.run_in_executor(self.executor, self.forward, x)
        except RuntimeError:  # the executor is shut down: the server is stopping
            _fail(batch, NotReady("the server is stopping"))
            return
        self._in_flight += 1
        done.add_done_callback(lambda done: self._answer(batch, done))

    def _answer(self, batch: Batch, done: asyncio.Future[np.ndarray]) -> None:
        self._in_flight -= 1
        slot, self._slot = self._slot, None
        if slot is not None and not slot.done():
            slot.set_result(None)
        if done.cancelled():  # the executor was shut down with the batch still queued
            _fail(batch, NotReady("the server is stopping"))
            return
        try:
            out = done.result()  # raises the forward's error
            if len(out) != sum(len(rows) for rows, _ in batch):
                raise RuntimeError(f"the model answered {len(out)} rows for this batch")
        except Exception as e:  # every caller of the batch gets it, the worker goes on
            _fail(batch, e)
            return
        start = 0
        for rows, future in batch:
            end = start + len(rows)
            if not future.done():  # a caller that went away (cancelled) is skipped
                future.set_result(out[start:end])
            start = end


def _fail(batch: Batch, error: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
