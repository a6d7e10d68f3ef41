"""Scale-out: `dynprune serve --replicas 2` under a local Ray instance on loopback, with
mixed-budget traffic through Ray Serve's proxy (slow: Ray takes ~20-40 s to start)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serve.server import ServerProcess

pytest.importorskip("ray")


@pytest.mark.slow
def test_two_replicas_serve_mixed_budget_traffic(tiny_checkpoint, tmp_path, engine):
    srv = ServerProcess(
        ["--checkpoint", str(tiny_checkpoint)],
        "--replicas",
        "2",
        "--max-batch",
        "8",
        "--max-wait-ms",
        "20",
        "--max-texts",
        "8",
        "--max-queue",
        "64",
        log=tmp_path / "ray.log",
    ).wait_ready(timeout=240)
    # /health answers from the first replica up; "ready on" is printed once both are
    srv.wait_for_log("replicas under Ray Serve)", timeout=240)
    try:
        budgets = [1.0, 0.75, 0.5, 0.3]
        texts = ["a fine film", "dull", "the plot never comes together", "smart and moving", "too long"]
        jobs = [(texts[i % len(texts)], budgets[i % len(budgets)]) for i in range(80)]

        async def fire():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
                replies = await asyncio.gather(
                    *(client.post("/v1/classify", json={"texts": [t], "budget": b}) for t, b in jobs)
                )
                # concurrent, so that the proxy's router (fewest ongoing requests) spreads them
                health = await asyncio.gather(*(client.get("/health") for _ in range(60)))
                return replies, {h.json()["pid"] for h in health}

        replies, pids = asyncio.run(fire())
        assert [r.status_code for r in replies] == [200] * len(jobs), [
            r.text for r in replies if r.status_code != 200
        ][:3]
        for (text, budget), r in zip(jobs, replies):
            item = r.json()["items"][0]
            ref = engine.classify_alone(text, budget, item["padded_len"])
            assert item["label_id"] == ref.label_id and item["flops_ratio"] == ref.flops_ratio
            assert max(abs(a - b) for a, b in zip(item["scores"], ref.scores)) < 1e-5
        assert len(pids) == 2, f"expected both replicas to answer, saw pids {pids}"
        assert max(r.json()["batch_size"] for r in replies) > 1
        bad = httpx.post(f"{srv.url}/v1/classify", json={"texts": ["a"], "budget": 0})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "budget"
    finally:
        code = srv.stop(timeout=120)
    assert code == 0, srv.log()[-3000:]
