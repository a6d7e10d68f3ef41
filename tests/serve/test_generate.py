"""/v1/generate and /v1/completions on a real server process (gated tiny Llama with the real
SmolLM2 tokenizer), talked to with httpx: answers equal unbatched generation, batching of
concurrent requests with per-row budgets, SSE streams, OpenAI shapes, seeds, timeouts."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

import dynprune
from dynprune.serve.generator import GenJob, Sampling
from tests.serve.conftest import LM_OPTIONS
from tests.serve.server import ServerProcess, metric, sse_events

PROMPTS = [
    "In the beginning",
    "The quick brown fox jumps over",
    "Café au lait, naïve façade — déjà vu",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "A long time ago in a galaxy far, far away, there was",
    "Hello",
]


def post(url: str, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


def reference(engine, prompt: str, budget: float, new: int, padded_len: int, **sampling):
    job = GenJob(tuple(engine.encode(prompt)), budget, Sampling(max_new_tokens=new, **sampling))
    return engine.generate_alone(job, padded_len)


def test_health_says_generation_with_context(lm_server):
    body = httpx.get(f"{lm_server.url}/health").json()
    assert body["status"] == "ready" and body["task"] == "generation"
    assert body["context"] == 2048 and body["labels"] == [] and 0 < body["min_budget"] < 0.5


@pytest.mark.parametrize("budget", [1.0, 0.6, 0.35])
def test_greedy_generate_equals_unbatched_generation(lm_server, lm_engine, budget):
    r = post(
        lm_server.url,
        "/v1/generate",
        {"prompt": PROMPTS[0], "max_new_tokens": 12, "temperature": 0, "budget": budget},
    )
    assert r.status_code == 200, r.text
    got = r.json()
    ref = reference(lm_engine, PROMPTS[0], budget, 12, got["padded_len"])
    assert got["token_ids"] == list(ref.token_ids) and got["text"] == ref.text
    assert got["flops_ratio"] == ref.flops_ratio and got["flops_ratio"] <= budget + 1e-9
    assert got["finish_reason"] in ("stop", "length") and got["completion_tokens"] == len(got["token_ids"])
    assert got["prompt_tokens"] == len(lm_engine.encode(PROMPTS[0])) <= got["padded_len"]
    if budget == 1.0:
        assert got["flops_ratio"] == 1.0


def test_open_gates_generate_like_the_unwrapped_model(lm_server, tiny_lm_checkpoint, lm_tokenizer):
    """Budget 1.0 is the base model's own greedy output, token for token."""
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_checkpoint / dynprune.io.BASE_DIR).eval()
    ids = torch.tensor([lm_tokenizer(PROMPTS[1])["input_ids"]])
    want = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    r = post(
        lm_server.url,
        "/v1/generate",
        {"prompt": PROMPTS[1], "max_new_tokens": 10, "temperature": 0, "budget": 1.0},
    )
    got = r.json()["token_ids"]
    assert got == want[0, ids.shape[1] :].tolist()[: len(got)]


def test_concurrent_requests_are_batched_with_their_own_budgets(lm_server, lm_engine):
    """12 greedy requests at 4 budgets at once: generate calls hold several of them, and every
    answer equals that prompt generated alone, left-padded to the same length, at its budget."""
    budgets = [1.0, 0.7, 0.5, 0.35]
    jobs = [(PROMPTS[i % len(PROMPTS)], budgets[i % len(budgets)]) for i in range(12)]

    async def fire():
        async with httpx.AsyncClient(base_url=lm_server.url, timeout=60) as client:
            body = {"max_new_tokens": 8, "temperature": 0}
            return await asyncio.gather(
                *(client.post("/v1/generate", json={**body, "prompt": p, "budget": b}) for p, b in jobs)
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    bodies = [r.json() for r in responses]
    assert max(b["batch_size"] for b in bodies) > 1, "concurrent requests were never batched"
    ratios = {}
    for (prompt, budget), got in zip(jobs, bodies):
        ref = reference(lm_engine, prompt, budget, 8, got["padded_len"])
        assert got["token_ids"] == list(ref.token_ids), (prompt, budget, got["batch_size"])
        assert got["flops_ratio"] == ref.flops_ratio <= budget + 1e-9
        ratios.setdefault(budget, []).append(got["flops_ratio"])
    assert max(ratios[0.35]) < min(ratios[1.0]) == 1.0  # budgets really differ within batches
    text = httpx.get(f"{lm_server.url}/metrics").text
    assert metric(text, "dynprune_generated_tokens_total") >= 12


def test_stream_sends_tokens_then_done_with_the_whole_answer(lm_server, lm_engine):
    body = {"prompt": PROMPTS[2], "max_new_tokens": 16, "temperature": 0, "budget": 0.5, "stream": True}
    with httpx.stream("POST", f"{lm_server.url}/v1/generate", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}, kinds
    done = json.loads(events[-1][1])
    tokens = [json.loads(d) for _, d in events[:-1]]
    assert "".join(t["text"] for t in tokens) == done["text"]
    assert [t["token_id"] for t in tokens if t["token_id"] is not None] == done["token_ids"]
    ref = reference(lm_engine, PROMPTS[2], 0.5, 16, done["padded_len"])
    assert done["token_ids"] == list(ref.token_ids) and done["flops_ratio"] == ref.flops_ratio


def test_completions_are_openai_shaped_json_and_stream(lm_server):
    body = {"model": "any", "prompt": PROMPTS[4], "max_tokens": 10, "temperature": 0, "budget": 0.6}
    r = post(lm_server.url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    choice = full["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert (
        full["usage"]["total_tokens"] == full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"]
    )
    assert full["dynprune"]["flops_ratio"] <= 0.6 + 1e-9
    with httpx.stream(
        "POST", f"{lm_server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        events = sse_events(s)
    assert events[-1] == ("message", "[DONE]")
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    if full["dynprune"]["padded_len"] == chunks[-1]["dynprune"]["padded_len"]:  # same forward shape
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]


def test_seeded_sampling_is_reproducible_and_seeds_differ(lm_server):
    body = {"prompt": PROMPTS[5], "max_new_tokens": 12, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = post(lm_server.url, "/v1/generate", {**body, "seed": 7}).json()
    b = post(lm_server.url, "/v1/generate", {**body, "seed": 7}).json()
    others = [
        post(lm_server.url, "/v1/generate", {**body, "seed": s}).json()["token_ids"] for s in (8, 9, 10)
    ]
    assert a["token_ids"] == b["token_ids"] and a["batch_size"] == 1
    assert any(o != a["token_ids"] for o in others)


def test_classify_on_a_language_model_names_what_it_needs(lm_server):
    r = post(lm_server.url, "/v1/classify", {"texts": ["a"]})
    assert r.status_code == 501 and r.json()["error"]["type"] == "task_not_served"


@pytest.fixture(scope="module")
def impatient_server(tiny_lm_dir, tmp_path_factory):
    """`--model` (a plain HF causal LM, open gates; budgets below 1.0 allowed for the smoke test) with a
    1.5 s request timeout."""
    log = tmp_path_factory.mktemp("serve-log") / "impatient.log"
    options = (*LM_OPTIONS, "--timeout-s", "1.5", "--untrained-budgets")
    proc = ServerProcess(["--model", str(tiny_lm_dir)], *options, log=log)
    yield proc.wait_ready()
    assert proc.stop() == 0, proc.log()


LONG = {"prompt": "Once upon a time", "max_new_tokens": 2000, "temperature": 0, "budget": 0.5}


def test_a_stream_that_runs_out_of_time_ends_with_an_error_event(impatient_server):
    with httpx.stream(
        "POST", f"{impatient_server.url}/v1/generate", json={**LONG, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        events = sse_events(r)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "error" and "done" not in kinds, kinds[-3:]
    assert kinds.count("token") >= 1  # it failed mid-way, after tokens were sent
    err = json.loads(events[-1][1])["error"]
    assert err["type"] == "timeout" and "incomplete" in err["message"]
    body = {"prompt": LONG["prompt"], "max_tokens": 2000, "temperature": 0, "budget": 0.5, "stream": True}
    with httpx.stream("POST", f"{impatient_server.url}/v1/completions", json=body, timeout=60) as r:
        events = sse_events(r)
    assert events[-1][0] == "error" and ("message", "[DONE]") not in events
    assert json.loads(events[-1][1])["error"]["type"] == "timeout"


def test_a_timed_out_generation_is_stopped_not_left_running(impatient_server):
    r = post(impatient_server.url, "/v1/generate", LONG)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    # the 2000-token generation stopped at its next step: a short request is answered in time
    short = post(impatient_server.url, "/v1/generate", {**LONG, "max_new_tokens": 4})
    assert short.status_code == 200, short.text
    assert short.json()["completion_tokens"] <= 4
    text = httpx.get(f"{impatient_server.url}/metrics").text
    assert metric(text, "dynprune_rejections_total", reason="timeout") >= 1
