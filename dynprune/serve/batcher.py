"""Dynamic batching: concurrent requests' texts are gathered into ONE forward.

One asyncio task collects queued items until ``max_batch`` are waiting or the
oldest has waited ``max_wait_s``, then runs them on a single worker thread
(the forward never blocks the event loop, and forwards never overlap). The
queue is bounded (``max_queue`` items): a submission that does not fit raises
:class:`QueueFull` at once. A caller that stops waiting (timeout, disconnect)
cancels its items' futures; cancelled items still queued are dropped, never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after_s: int):
        super().__init__(f"queue full ({depth} texts waiting); retry after {retry_after_s} s")
        self.depth, self.retry_after_s = depth, retry_after_s


class Draining(Exception):
    """The server is shutting down: queued work finishes, new work is refused."""


@dataclass(eq=False)
class _Item:
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


RunBatch = Callable[[list[Any]], Sequence[Any]]
OnBatch = Callable[[int, float], None]  # (texts in the forward, seconds it took)


class Batcher:
    def __init__(
        self,
        run: RunBatch,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: OnBatch | None = None,
        on_drop: Callable[[int], None] | None = None,
    ):
        if max_batch <= 0 or max_queue <= 0 or max_wait_s < 0:
            raise ValueError(f"Batcher: bad limits {max_batch=} {max_queue=} {max_wait_s=}")
        self._run, self._on_batch, self._on_drop = run, on_batch, on_drop
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._queue: deque[_Item] = deque()
        self._changed = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._batch_s = 0.05  # running mean of forward time, for Retry-After

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynprune-forward")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dynprune-batcher")

    async def close(self) -> None:
        """Refuse new work, finish what is queued or running, then stop the worker thread."""
        self._closing = True
        self._changed.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def closing(self) -> bool:
        return self._closing

    def depth(self) -> int:
        """Items waiting (not yet in a forward), excluding ones whose caller gave up."""
        return sum(1 for item in self._queue if not item.future.done())

    def retry_after_s(self) -> int:
        return max(1, math.ceil((self.depth() / self.max_batch + 1) * self._batch_s))

    # -- submission --------------------------------------------------------------------
    def enqueue(self, payloads: Sequence[Any]) -> list[asyncio.Future]:
        """Queue ``payloads`` now (or raise Draining / QueueFull); one future per payload."""
        if self._closing:
            raise Draining("server is shutting down")
        depth = self.depth()
        if depth + len(payloads) > self.max_queue:
            raise QueueFull(depth, self.retry_after_s())
        loop = asyncio.get_running_loop()
        items = [_Item(p, loop.create_future()) for p in payloads]
        self._queue.extend(items)
        self._changed.set()
        return [i.future for i in items]

    async def submit(self, payloads: Sequence[Any]) -> list[Any]:
        """Queue ``payloads`` (one per text) and wait for their results, in order."""
        futures = self.enqueue(payloads)
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:  # timeout / disconnect / error: drop what has not run
                future.cancel()
            raise

    # -- the loop ----------------------------------------------------------------------
    def _drop_abandoned(self) -> None:
        dropped = 0
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
            dropped += 1
        if dropped and self._on_drop is not None:
            self._on_drop(dropped)

    async def _wait_changed(self, timeout: float | None) -> None:
        self._changed.clear()
        if timeout is None:
            await self._changed.wait()
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _loop(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._queue:
                if self._closing:
                    return
                await self._wait_changed(None)
                continue
            deadline = self._queue[0].enqueued + self.max_wait_s
            while not self._closing and self.depth() < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait_changed(remaining)
                self._drop_abandoned()
                if not self._queue:
                    break
            batch: list[_Item] = []
            dropped = 0
            while self._queue and len(batch) < self.max_batch:
                item = self._queue.popleft()
                if item.future.done():
                    dropped += 1
                else:
                    batch.append(item)
            if dropped and self._on_drop is not None:
                self._on_drop(dropped)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._run, [i.payload for i in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as err:  # the forward failed: every caller in this batch gets the error
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        elapsed = time.perf_counter() - start
        self._batch_s = 0.8 * self._batch_s + 0.2 * elapsed
        for item, result in zip(batch, results):
            if not item.future.done():
                item.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
