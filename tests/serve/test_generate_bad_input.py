"""The bad-input corpus, generation part (issue 13's "Bad input" + the sampling fields), on a
real server with a causal LM: each case gets a 4xx JSON error naming the field and saying what
is wrong, before any generation; the server still answers a valid request correctly after."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.server import metric
from tests.serve.test_bad_input import JSON, body, raw
from tests.serve.test_generate import reference

G, C = "/v1/generate", "/v1/completions"
LONG_PROMPT = " word" * 3000  # > 2048 tokens (the tiny LM's context), < 20000 characters

# (name, path, payload bytes, status, field, substring of the message)
GEN_CASES = [
    ("empty prompt", G, body({"prompt": ""}), 422, "prompt", "empty"),
    ("blank prompt", C, body({"prompt": " \n "}), 422, "prompt", "empty"),
    ("missing prompt", C, body({"max_tokens": 3}), 422, "prompt", "required"),
    ("prompt is a number", G, body({"prompt": 42}), 422, "prompt", "string"),
    ("prompt is a list", C, body({"prompt": ["a", "b"]}), 422, "prompt", "string"),
    ("prompt longer than the context", G, body({"prompt": LONG_PROMPT}), 422, "prompt", "context"),
    (
        "prompt + max_new_tokens beyond the context",
        G,
        body({"prompt": " word" * 900, "max_new_tokens": 1500}),
        422,
        "max_new_tokens",
        "exceeds",
    ),
    (
        "prompt + max_tokens beyond the context",
        C,
        body({"prompt": " word" * 900, "max_tokens": 1500}),
        422,
        "max_tokens",
        "exceeds",
    ),
    ("prompt over the character limit", G, body({"prompt": "x" * 30_000}), 422, "prompt", "at most 20000"),
    ("NUL in prompt", G, body({"prompt": "a\u0000b"}), 422, "prompt", "U+0000"),
    ("lone surrogate in prompt", C, raw('{"prompt": "a \\udc00 b"}'), 422, "prompt", "surrogate"),
    (
        "max_new_tokens 0",
        G,
        body({"prompt": "hi", "max_new_tokens": 0}),
        422,
        "max_new_tokens",
        "greater than or equal to 1",
    ),
    (
        "max_new_tokens huge",
        G,
        body({"prompt": "hi", "max_new_tokens": 10**12}),
        422,
        "max_new_tokens",
        "less than or equal to 4096",
    ),
    (
        "max_new_tokens float",
        G,
        body({"prompt": "hi", "max_new_tokens": 2.5}),
        422,
        "max_new_tokens",
        "integer",
    ),
    (
        "max_new_tokens boolean",
        G,
        body({"prompt": "hi", "max_new_tokens": True}),
        422,
        "max_new_tokens",
        "integer",
    ),
    (
        "max_tokens negative",
        C,
        body({"prompt": "hi", "max_tokens": -5}),
        422,
        "max_tokens",
        "greater than or equal to 1",
    ),
    ("budget 0", G, body({"prompt": "hi", "budget": 0}), 422, "budget", "(0, 1]"),
    ("budget NaN", C, raw('{"prompt": "hi", "budget": NaN}'), 422, "budget", "(0, 1]"),
    ("budget boolean", G, body({"prompt": "hi", "budget": True}), 422, "budget", "bool"),
    (
        "budget below the model's floor",
        G,
        body({"prompt": "hi", "budget": 0.1}),
        422,
        "budget",
        "smallest budget",
    ),
    ("budget list", G, body({"prompt": "hi", "budget": [0.5]}), 422, "budget", "one number"),
    ("budget mean object", C, body({"prompt": "hi", "budget": {"mean": 0.5}}), 422, "budget", "one number"),
    (
        "beam search",
        G,
        body({"prompt": "hi", "num_beams": 4}),
        422,
        "num_beams",
        "beam search is not supported",
    ),
    ("best_of", C, body({"prompt": "hi", "best_of": 3}), 422, "best_of", "not supported"),
    ("n > 1", C, body({"prompt": "hi", "n": 2}), 422, "n", "less than or equal to 1"),
    (
        "temperature negative",
        G,
        body({"prompt": "hi", "temperature": -1}),
        422,
        "temperature",
        "greater than or equal to 0",
    ),
    (
        "temperature huge",
        C,
        body({"prompt": "hi", "temperature": 100}),
        422,
        "temperature",
        "less than or equal to 10",
    ),
    ("top_p 0", G, body({"prompt": "hi", "top_p": 0}), 422, "top_p", "greater than 0"),
    ("top_p > 1", C, body({"prompt": "hi", "top_p": 1.5}), 422, "top_p", "less than or equal to 1"),
    ("top_k negative", G, body({"prompt": "hi", "top_k": -1}), 422, "top_k", "greater than or equal to 0"),
    ("seed negative", G, body({"prompt": "hi", "seed": -1}), 422, "seed", "greater than or equal to 0"),
    ("seed string", C, body({"prompt": "hi", "seed": "7"}), 422, "seed", "integer"),
    ("stream string", G, body({"prompt": "hi", "stream": "yes"}), 422, "stream", "boolean"),
    ("unknown field stop", C, body({"prompt": "hi", "stop": ["\n"]}), 422, "stop", "unknown field"),
    (
        "unknown field do_sample",
        G,
        body({"prompt": "hi", "do_sample": True}),
        422,
        "do_sample",
        "unknown field",
    ),
    ("invalid JSON", G, raw('{"prompt": "hi"'), 422, "body", "not valid JSON"),
]


@pytest.fixture(scope="module")
def client(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=60) as c:
        yield c


def test_generation_corpus_is_large_and_named_uniquely():
    assert len(GEN_CASES) >= 30 and len({c[0] for c in GEN_CASES}) == len(GEN_CASES)


@pytest.mark.parametrize(
    ("name", "path", "payload", "status", "field", "says"), GEN_CASES, ids=[c[0] for c in GEN_CASES]
)
def test_bad_generation_input_gets_json_4xx_naming_the_field(
    client, name, path, payload, status, field, says
):
    r = client.post(path, content=payload, headers=JSON)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["field"] == field, err
    assert says.lower() in err["message"].lower(), err


def test_bad_stream_request_is_refused_before_streaming(client):
    r = client.post(G, json={"prompt": "", "stream": True})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")


def test_server_generates_correctly_after_the_corpus(client, lm_engine):
    for _, path, payload, *_ in GEN_CASES:
        client.post(path, content=payload, headers=JSON)
    r = client.post(G, json={"prompt": "And God said", "max_new_tokens": 6, "temperature": 0, "budget": 0.5})
    assert r.status_code == 200, r.text
    got = r.json()
    ref = reference(lm_engine, "And God said", 0.5, 6, got["padded_len"])
    assert got["token_ids"] == list(ref.token_ids) and got["flops_ratio"] == ref.flops_ratio
    text = client.get("/metrics").text
    assert metric(text, "dynprune_rejections_total", reason="invalid") >= len(GEN_CASES)
    assert metric(text, "dynprune_rejections_total", reason="error") == 0
