"""The bad-input corpus, generation part (issue 13's "Bad input" + the sampling fields), on a
real server with a causal LM: each case gets a 4xx JSON error naming the field and saying what
is wrong, before any generation; the server still answers a valid request correctly after."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.bad_input import BadInput, body, check_corpus, check_refused, raw, send_all
from tests.serve.server import metric
from tests.serve.test_generate import reference

G, C = "/v1/generate", "/v1/completions"
LONG_PROMPT = " word" * 3000  # > 2048 tokens (the tiny LM's context), < 20000 characters

GEN_CASES = [
    BadInput("empty prompt", G, body({"prompt": ""}), 422, "prompt", "empty"),
    BadInput("blank prompt", C, body({"prompt": " \n "}), 422, "prompt", "empty"),
    BadInput("missing prompt", C, body({"max_tokens": 3}), 422, "prompt", "required"),
    BadInput("prompt is a number", G, body({"prompt": 42}), 422, "prompt", "string"),
    BadInput("prompt is a list", C, body({"prompt": ["a", "b"]}), 422, "prompt", "string"),
    BadInput("prompt longer than the context", G, body({"prompt": LONG_PROMPT}), 422, "prompt", "context"),
    BadInput(
        "prompt + max_new_tokens beyond the context",
        G,
        body({"prompt": " word" * 900, "max_new_tokens": 1500}),
        422,
        "max_new_tokens",
        "exceeds",
    ),
    BadInput(
        "prompt + max_tokens beyond the context",
        C,
        body({"prompt": " word" * 900, "max_tokens": 1500}),
        422,
        "max_tokens",
        "exceeds",
    ),
    BadInput(
        "prompt over the character limit", G, body({"prompt": "x" * 30_000}), 422, "prompt", "at most 20000"
    ),
    BadInput("NUL in prompt", G, body({"prompt": "a\u0000b"}), 422, "prompt", "U+0000"),
    BadInput("lone surrogate in prompt", C, raw('{"prompt": "a \\udc00 b"}'), 422, "prompt", "surrogate"),
    BadInput(
        "max_new_tokens 0",
        G,
        body({"prompt": "hi", "max_new_tokens": 0}),
        422,
        "max_new_tokens",
        "greater than or equal to 1",
    ),
    BadInput(
        "max_new_tokens huge",
        G,
        body({"prompt": "hi", "max_new_tokens": 10**12}),
        422,
        "max_new_tokens",
        "less than or equal to 4096",
    ),
    BadInput(
        "max_new_tokens float",
        G,
        body({"prompt": "hi", "max_new_tokens": 2.5}),
        422,
        "max_new_tokens",
        "integer",
    ),
    BadInput(
        "max_new_tokens boolean",
        G,
        body({"prompt": "hi", "max_new_tokens": True}),
        422,
        "max_new_tokens",
        "integer",
    ),
    BadInput(
        "max_tokens negative",
        C,
        body({"prompt": "hi", "max_tokens": -5}),
        422,
        "max_tokens",
        "greater than or equal to 1",
    ),
    BadInput("budget 0", G, body({"prompt": "hi", "budget": 0}), 422, "budget", "(0, 1]"),
    BadInput("budget NaN", C, raw('{"prompt": "hi", "budget": NaN}'), 422, "budget", "(0, 1]"),
    BadInput("budget boolean", G, body({"prompt": "hi", "budget": True}), 422, "budget", "bool"),
    BadInput(
        "budget below the model's floor",
        G,
        body({"prompt": "hi", "budget": 0.1}),
        422,
        "budget",
        "smallest budget",
    ),
    BadInput("budget list", G, body({"prompt": "hi", "budget": [0.5]}), 422, "budget", "one number"),
    BadInput(
        "budget mean object", C, body({"prompt": "hi", "budget": {"mean": 0.5}}), 422, "budget", "one number"
    ),
    BadInput(
        "beam search",
        G,
        body({"prompt": "hi", "num_beams": 4}),
        422,
        "num_beams",
        "beam search is not supported",
    ),
    BadInput("best_of", C, body({"prompt": "hi", "best_of": 3}), 422, "best_of", "not supported"),
    BadInput("n > 1", C, body({"prompt": "hi", "n": 2}), 422, "n", "less than or equal to 1"),
    BadInput(
        "temperature negative",
        G,
        body({"prompt": "hi", "temperature": -1}),
        422,
        "temperature",
        "greater than or equal to 0",
    ),
    BadInput(
        "temperature huge",
        C,
        body({"prompt": "hi", "temperature": 100}),
        422,
        "temperature",
        "less than or equal to 10",
    ),
    BadInput("top_p 0", G, body({"prompt": "hi", "top_p": 0}), 422, "top_p", "greater than 0"),
    BadInput("top_p > 1", C, body({"prompt": "hi", "top_p": 1.5}), 422, "top_p", "less than or equal to 1"),
    BadInput(
        "top_k negative", G, body({"prompt": "hi", "top_k": -1}), 422, "top_k", "greater than or equal to 0"
    ),
    BadInput(
        "seed negative", G, body({"prompt": "hi", "seed": -1}), 422, "seed", "greater than or equal to 0"
    ),
    BadInput("seed string", C, body({"prompt": "hi", "seed": "7"}), 422, "seed", "integer"),
    BadInput("stream string", G, body({"prompt": "hi", "stream": "yes"}), 422, "stream", "boolean"),
    BadInput("unknown field stop", C, body({"prompt": "hi", "stop": ["\n"]}), 422, "stop", "unknown field"),
    BadInput(
        "unknown field do_sample",
        G,
        body({"prompt": "hi", "do_sample": True}),
        422,
        "do_sample",
        "unknown field",
    ),
    BadInput("invalid JSON", G, raw('{"prompt": "hi"'), 422, "body", "not valid JSON"),
]


@pytest.fixture(scope="module")
def client(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=60) as c:
        yield c


def test_generation_corpus_is_large_and_named_uniquely():
    check_corpus(GEN_CASES, at_least=30)


@pytest.mark.parametrize("case", GEN_CASES, ids=[c.name for c in GEN_CASES])
def test_bad_generation_input_gets_json_4xx_naming_the_field(client, case):
    check_refused(client, case)


def test_bad_stream_request_is_refused_before_streaming(client):
    r = client.post(G, json={"prompt": "", "stream": True})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")


def test_server_generates_correctly_after_the_corpus(client, lm_engine):
    send_all(client, GEN_CASES)
    r = client.post(G, json={"prompt": "And God said", "max_new_tokens": 6, "temperature": 0, "budget": 0.5})
    assert r.status_code == 200, r.text
    got = r.json()
    ref = reference(lm_engine, "And God said", 0.5, 6, got["padded_len"])
    assert got["token_ids"] == list(ref.token_ids) and got["flops_ratio"] == ref.flops_ratio
    text = client.get("/metrics").text
    assert metric(text, "dynprune_rejections_total", reason="invalid") >= len(GEN_CASES)
    assert metric(text, "dynprune_rejections_total", reason="error") == 0
