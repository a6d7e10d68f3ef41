"""The batcher on its own, with a plain function as the 'model' (records what ran together)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dynprune.serve.batcher import Batcher, Draining, QueueFull


class Recorder:
    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s

    def __call__(self, payloads: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.calls.append(list(payloads))
        time.sleep(self.delay_s)
        return [p * 10 for p in payloads]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_submissions_share_one_call_in_order():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=16, max_wait_s=0.05, max_queue=64)
        b.start()
        out = await asyncio.gather(b.submit([1, 2]), b.submit([3]), b.submit([4, 5, 6]))
        await b.close()
        return rec, out

    rec, out = run(main())
    assert out == [[10, 20], [30], [40, 50, 60]]
    assert rec.calls == [[1, 2, 3, 4, 5, 6]]
    assert len(rec.threads) == 1 and next(iter(rec.threads)).startswith("dynprune-forward")


def test_max_batch_splits_and_a_full_batch_does_not_wait():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=4, max_wait_s=5.0, max_queue=64)
        b.start()
        t = time.monotonic()
        out = await b.submit(list(range(8)))
        took = time.monotonic() - t
        await b.close()
        return rec, out, took

    rec, out, took = run(main())
    assert out == [p * 10 for p in range(8)]
    assert rec.calls == [[0, 1, 2, 3], [4, 5, 6, 7]] and took < 2.0


def test_queue_bound_and_abandoned_items_are_never_run():
    async def main():
        rec = Recorder()
        dropped = []
        b = Batcher(rec, max_batch=64, max_wait_s=0.3, max_queue=3, on_drop=dropped.append)
        b.start()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit([1, 2]), 0.05)
        assert b.depth() == 0  # the abandoned items no longer count against the bound
        first = asyncio.ensure_future(b.submit([3, 4, 5]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as full:
            await b.submit([6])
        assert full.value.retry_after_s >= 1
        assert await first == [30, 40, 50]
        await b.close()
        return rec, dropped

    rec, dropped = run(main())
    assert rec.calls == [[3, 4, 5]] and sum(dropped) == 2


def test_an_error_reaches_every_caller_of_that_batch_and_the_next_batch_runs():
    calls = []

    def flaky(payloads):
        calls.append(payloads)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return payloads

    async def main():
        b = Batcher(flaky, max_batch=8, max_wait_s=0.02, max_queue=8)
        b.start()
        results = await asyncio.gather(b.submit([1]), b.submit([2]), return_exceptions=True)
        again = await b.submit([3])
        await b.close()
        return results, again

    results, again = run(main())
    assert all(isinstance(r, RuntimeError) for r in results) and again == [3]


def test_close_finishes_queued_work_then_refuses():
    async def main():
        rec = Recorder(delay_s=0.05)
        b = Batcher(rec, max_batch=2, max_wait_s=0.5, max_queue=8)
        b.start()
        pending = asyncio.ensure_future(b.submit([1, 2, 3]))
        await asyncio.sleep(0.01)
        await b.close()
        with pytest.raises(Draining):
            await b.submit([4])
        return await pending

    assert run(main()) == [10, 20, 30]
