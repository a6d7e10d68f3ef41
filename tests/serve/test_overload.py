"""Overload, timeouts and shutdown on real server processes: 429 + Retry-After when the queue is
full, 504 with the work dropped past the timeout, SIGTERM finishes in-flight requests."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serve.server import ServerProcess, metric


def start(tiny_checkpoint, tmp_path, *options: str) -> ServerProcess:
    return ServerProcess(
        ["--checkpoint", str(tiny_checkpoint)], *options, log=tmp_path / "server.log"
    ).wait_ready()


async def post_all(url: str, bodies: list[dict], stagger_s: float = 0.0) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def one(i: int, body: dict) -> httpx.Response:
            await asyncio.sleep(i * stagger_s)
            return await client.post("/v1/classify", json=body)

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


def test_full_queue_gets_429_and_timed_out_work_is_dropped(tiny_checkpoint, tmp_path):
    # texts wait up to 1.5 s for company (max-batch 64 is never reached); 4 texts may wait;
    # a request is given 0.4 s: the first two requests time out in the queue, the third does not fit
    srv = start(
        tiny_checkpoint,
        tmp_path,
        "--max-batch",
        "64",
        "--max-wait-ms",
        "1500",
        "--max-queue",
        "4",
        "--max-texts",
        "2",
        "--timeout-s",
        "0.4",
    )
    try:
        two = {"texts": ["a fine film", "dull"], "budget": 0.5}
        start_t = time.monotonic()
        responses = asyncio.run(post_all(srv.url, [two, two, two], stagger_s=0.05))
        codes = [r.status_code for r in responses]
        assert sorted(codes) == [429, 504, 504], [r.text for r in responses]  # any two fit, the third not
        assert time.monotonic() - start_t < 30  # nothing hangs
        full = next(r for r in responses if r.status_code == 429)
        assert int(full.headers["retry-after"]) >= 1
        assert full.json()["error"]["type"] == "queue_full"
        assert next(r for r in responses if r.status_code == 504).json()["error"]["type"] == "timeout"
        assert httpx.get(f"{srv.url}/health").json()["queue_depth"] == 0  # timed-out texts left the queue
        time.sleep(1.6)  # the batcher wakes at the 1.5 s deadline and drops them unrun
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "dynprune_dropped_texts_total") == 4
        assert metric(text, "dynprune_batch_size_count") == 0  # no forward ran for them
        assert metric(text, "dynprune_rejections_total", reason="queue_full") == 1
        assert metric(text, "dynprune_rejections_total", reason="timeout") == 2
    finally:
        assert srv.stop() == 0, srv.log()


def test_overload_beyond_the_queue_gets_429s_and_the_rest_answers(tiny_checkpoint, tmp_path):
    srv = start(
        tiny_checkpoint,
        tmp_path,
        "--max-batch",
        "4",
        "--max-wait-ms",
        "5",
        "--max-queue",
        "8",
        "--max-texts",
        "4",
    )
    try:
        bodies = [{"texts": ["a fine film", "dull", "long and slow"], "budget": [0.5, 0.7, 1.0]}] * 60
        responses = asyncio.run(post_all(srv.url, bodies))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0, codes
        assert all("retry-after" in r.headers for r in responses if r.status_code == 429)
        assert httpx.post(f"{srv.url}/v1/classify", json=bodies[0]).status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tiny_checkpoint, tmp_path):
    srv = start(tiny_checkpoint, tmp_path, "--max-batch", "64", "--max-wait-ms", "1500")

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            in_flight = [
                asyncio.create_task(client.post("/v1/classify", json={"texts": [t], "budget": 0.5}))
                for t in ("a fine film", "dull")
            ]
            await asyncio.sleep(0.4)  # both are waiting in the batcher
            srv.terminate()
            await asyncio.sleep(0.3)
            async with httpx.AsyncClient(base_url=srv.url, timeout=5) as fresh:
                try:
                    late = (await fresh.post("/v1/classify", json={"texts": ["late"]})).status_code
                except httpx.TransportError:
                    late = "refused"
            return await asyncio.gather(*in_flight), late

    done, late = asyncio.run(scenario())
    assert [r.status_code for r in done] == [200, 200], [r.text for r in done]
    assert all(r.json()["items"][0]["flops_ratio"] <= 0.5 for r in done)
    assert late in ("refused", 503)
    assert srv.proc.wait(30) == 0, srv.log()
    assert "in-flight requests finished" in srv.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{srv.url}/health", timeout=2)
    srv.stop()
