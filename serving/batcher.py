"""Dynamic micro-batching: concurrent requests for one model version are queued on the
event loop, gathered into one batch (up to `max_batch_size` rows; under load, waiting at most
`max_wait_us` for more after the first), run in a worker thread so the event loop never
blocks on torch, and the result rows are handed back to each caller.

Up to `max_in_flight` batches may run at once (one per forward thread; the server runs one,
see serving.server.PIPELINE): while one batch is in its forward pass, the next one gathers,
its requests parsed and decoded by the event loop, and starts as soon as a thread is free.
A batch then takes at most its share of `max_batch_size` (divided among the batches in
flight; a request that would overfill it opens the next batch): otherwise a burst of
requests (every client answered at once comes back at once) all joins one batch and the
other forward thread has nothing to do.

Fair to small requests: a request larger than a share is split into chunks of at most a
share, and after each chunk it goes back to the end of the line, so the requests that
arrived meanwhile ride in the next batch (beside its next chunk when there is room). A
concurrent small request waits for at most the batch in flight, never for the whole of a
large one; the large one's rows are reassembled in order for its caller
(docs/serving.md, "Fair batching").

Every caller hears back: its rows, the error of its batch's forward pass (for a split
request, the first failed chunk's; its other chunks are then dropped), or `NotReady` when
the executor is shut down under a queued batch. `close()` stops gathering after the
requests queued before it (and every chunk of theirs); batches already in flight still
answer their callers.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np

from mlbus.serving.errors import NotReady

Forward = Callable[[np.ndarray], np.ndarray]
_CLOSE = None  # queue sentinel: drain what is before it, then stop


class _Job:
    """One caller's rows, taken in one or more chunks; its answer is assembled from them."""

    __slots__ = ("answered", "future", "parts", "taken", "x")

    def __init__(self, x: np.ndarray, future: asyncio.Future[np.ndarray]) -> None:
        self.x = x
        self.future = future
        self.taken = 0  # rows handed to batches so far
        self.answered = 0  # rows answered so far
        self.parts: list[tuple[int, np.ndarray]] = []  # (first row, output rows)

    def deliver(self, start: int, out: np.ndarray) -> None:
        if self.future.done():  # a caller that went away (cancelled), or a failed chunk
            return
        if start == 0 and len(out) == len(self.x):  # in one piece: the common case
            self.future.set_result(out)
            return
        self.parts.append((start, out))
        self.answered += len(out)
        if self.answered == len(self.x):
            self.parts.sort(key=lambda part: part[0])  # batches may finish out of order
            self.future.set_result(np.concatenate([p for _, p in self.parts]))
            self.parts = []


#: A batch: chunks of jobs, each (job, first row, end row).
Batch = list[tuple[_Job, int, int]]


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
        # Requests taken off the queue, not yet in a batch (arrival order), and requests
        # larger than a share with rows left to run (in turns, after the new ones).
        self._pending: deque[_Job] = deque()
        self._split: deque[_Job] = deque()
        self._split_starved = False
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
        while not (stopping and not self._pending and not self._split):
            if self._in_flight >= self.max_in_flight:  # gather once a forward thread is free
                # No wakeup is lost: `_answer` runs on this loop, so it cannot run between
                # the check and the await, and it resolves the slot it finds.
                self._slot = loop.create_future()
                await self._slot
                continue
            if not self._pending and not self._split and not stopping:
                first = await queue.get()
                if first is _CLOSE:
                    break
                self._pending.append(_Job(*first))
            stopping = self._take(queue) or stopping
            batch: Batch = []
            # Wait for company only under load (the last batch had several requests): a
            # lone client is not made to wait max_wait for requests that are not coming.
            deadline = loop.time() + (self.max_wait if self._last_requests > 1 else 0.0)
            rows = self._fill(batch, 0)
            while rows < self.share and not (stopping or self._pending or self._split):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if queue.empty():
                    await self._wait(loop, remaining)
                stopping = self._take(queue) or stopping
                rows = self._fill(batch, rows)
            if batch:
                self._last_requests = len(batch)
                self._start(loop, batch)
        # Batches still in flight are answered by `_answer` (a callback, not this task).

    def _take(
        self, queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]] | None]
    ) -> bool:
        """Move what is queued to the pending line; True once `close()`'s sentinel is seen
        (what was queued after it is not taken)."""
        while not queue.empty():
            item = queue.get_nowait()
            if item is _CLOSE:
                return True
            self._pending.append(_Job(*item))
        return False

    def _fill(self, batch: Batch, rows: int) -> int:
        """Add pending requests to `batch` (holding `rows` rows) up to the share; the rows
        it holds then. New requests go first, in arrival order (one that fits in a batch
        but not in this one opens the next), then the chunks of split requests, in turns;
        but a batch that gave the split requests waiting before it nothing makes the next
        one start with them, so a steady stream of small requests cannot starve a large one."""
        if self._split_starved:
            self._split_starved = False
            return self._new(batch, self._chunks(batch, rows))
        waiting = bool(self._split)
        rows = self._new(batch, rows)
        before = rows
        rows = self._chunks(batch, rows)
        self._split_starved = waiting and rows == before and bool(self._split)
        return rows

    def _new(self, batch: Batch, rows: int) -> int:
        pending = self._pending
        while pending and rows < self.share:
            job = pending[0]
            if job.future.done():  # cancelled while queued
                pending.popleft()
                continue
            room = self.share - rows
            if len(job.x) <= room:
                batch.append((job, 0, len(job.x)))
                job.taken = len(job.x)
                rows += len(job.x)
            elif len(job.x) > self.share:  # split: its first chunk now, the rest in turns
                batch.append((job, 0, room))
                job.taken = room
                rows += room
                self._split.append(job)
            else:
                break
            pending.popleft()
        return rows

    def _chunks(self, batch: Batch, rows: int) -> int:
        split = self._split
        while split and rows < self.share:
            job = split[0]
            if job.future.done():  # cancelled, or a chunk of it failed: drop the rest
                split.popleft()
                continue
            take = min(len(job.x) - job.taken, self.share - rows)
            batch.append((job, job.taken, job.taken + take))
            job.taken += take
            rows += take
            if job.taken == len(job.x):
                split.popleft()
            else:
                split.rotate(-1)  # the next split request's turn
        return rows

    def _start(self, loop: asyncio.AbstractEventLoop, batch: Batch) -> None:
        """Run a batch's forward pass in the executor; `_answer` hands out its rows (a
        callback rather than a task per batch: a lone client's request pays for no more
        than the executor's round trip)."""
        try:
            x = _rows(batch[0]) if len(batch) == 1 else np.concatenate([_rows(c) for c in batch])
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
            if len(out) != sum(end - start for _, start, end in batch):
                raise RuntimeError(f"the model answered {len(out)} rows for this batch")
        except Exception as e:  # every caller of the batch gets it, the worker goes on
            _fail(batch, e)
            return
        at = 0
        for job, start, end in batch:
            job.deliver(start, out[at : at + end - start])
            at += end - start


def _rows(chunk: tuple[_Job, int, int]) -> np.ndarray:
    job, start, end = chunk
    return job.x if start == 0 and end == len(job.x) else job.x[start:end]


def _fail(batch: Batch, error: BaseException) -> None:
    for job, _, _ in batch:
        if not job.future.done():
            job.future.set_exception(error)
