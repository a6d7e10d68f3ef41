"""A real server process on loopback, talked to with httpx: answers, batching, metrics, docs."""

from __future__ import annotations

import asyncio
import math

import httpx

from tests.serve.server import metric

TEXTS = [
    "a gripping, funny and warm film",
    "dull",
    "the plot never quite comes together, but the actors are wonderful to watch for two hours",
    "an unqualified disaster",
    "smart, sharp and surprisingly moving",
    "not bad at all",
    "i laughed, i cried, i left early",
    "a film about nothing in particular that goes on for far too long and then ends abruptly",
]


def classify(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json=body, timeout=30)


def test_health_says_ready_with_limits(server):
    body = httpx.get(f"{server.url}/health").json()
    assert body["status"] == "ready"
    assert body["task"] == "classification" and body["labels"] == ["negative", "positive"]
    assert body["max_batch"] == 8 and 0 < body["min_budget"] < 1


def test_classify_reports_flops_within_each_budget(server):
    budgets = [1.0, 0.9, 0.6, 0.4]
    r = classify(server.url, {"texts": TEXTS[:4], "budget": budgets})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [it["budget"] for it in items] == budgets
    assert items[0]["flops_ratio"] == 1.0
    for it, b in zip(items, budgets):
        assert 0 < it["flops_ratio"] <= b + 1e-9
        assert math.isclose(sum(it["scores"]), 1.0, rel_tol=1e-5)
        assert it["label"] in ("negative", "positive") and it["tokens"] <= it["padded_len"]
    assert items[3]["flops_ratio"] < items[1]["flops_ratio"]  # lower budget, less work


def test_one_number_applies_to_every_text_and_default_is_dense(server):
    one = classify(server.url, {"texts": TEXTS[:3], "budget": 0.5}).json()["items"]
    assert all(it["budget"] == 0.5 and it["flops_ratio"] <= 0.5 for it in one)
    dense = classify(server.url, {"texts": TEXTS[:2]}).json()["items"]
    assert all(it["budget"] == 1.0 and it["flops_ratio"] == 1.0 for it in dense)


def test_concurrent_mixed_budgets_share_forwards_and_equal_unbatched(server, engine):
    """24 single-text requests at 6 budgets at once: they are batched together, and every
    answer equals the unbatched forward of that text at the same padded length."""
    budgets = [1.0, 0.8, 0.65, 0.5, 0.4, 0.3]
    jobs = [(TEXTS[i % len(TEXTS)], budgets[i % len(budgets)]) for i in range(24)]

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/classify", json={"texts": [t], "budget": b}) for t, b in jobs)
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert max(b["batch_size"] for b in bodies) > 1, "concurrent requests were never batched"
    flops_by_budget: dict[float, set[float]] = {}
    for (text, budget), body in zip(jobs, bodies):
        item = body["items"][0]
        ref = engine.classify_alone(text, budget, item["padded_len"])
        assert item["label_id"] == ref.label_id
        assert item["flops_ratio"] == ref.flops_ratio  # same masks
        assert max(abs(a - b) for a, b in zip(item["scores"], ref.scores)) < 1e-5
        flops_by_budget.setdefault(budget, set()).add(round(item["flops_ratio"], 6))
    assert len({min(v) for v in flops_by_budget.values()}) > 3  # budgets really differ within batches


def test_metrics_expose_latency_batches_queue_flops_rejections(server):
    classify(server.url, {"texts": TEXTS[:2], "budget": 0.5})
    classify(server.url, {"texts": [], "budget": 0.5})  # one rejection
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        'dynprune_request_latency_seconds_bucket{endpoint="/v1/classify"',
        "dynprune_batch_size_count",
        "dynprune_queue_depth",
        "dynprune_flops_ratio_bucket",
        'dynprune_rejections_total{reason="queue_full"}',
        'dynprune_rejections_total{reason="timeout"}',
    ):
        assert name in text, name
    assert metric(text, "dynprune_rejections_total", reason="invalid") >= 1
    assert metric(text, "dynprune_batch_size_sum") >= 2


def test_docs_and_openapi_list_every_endpoint(server):
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/generate", "/v1/completions", "/health", "/metrics"} <= set(paths)


def test_generation_routes_name_what_they_need(server):
    for path, body in (("/v1/generate", {"prompt": "Once"}), ("/v1/completions", {"prompt": "Once"})):
        r = httpx.post(f"{server.url}{path}", json=body)
        assert r.status_code == 501
        err = r.json()["error"]
        assert err["type"] == "task_not_served" and "causal language model" in err["message"]
