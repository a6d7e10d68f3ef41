"""The bad-input corpus: every case gets a 4xx JSON error naming the field and what is wrong,
and the server still answers a valid request correctly afterwards (a real server process)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve.server import metric

JSON = {"content-type": "application/json"}
OK_TEXT = "a fine film"


def body(obj) -> bytes:
    return json.dumps(obj).encode()


def raw(text: str) -> bytes:
    return text.encode()


# (name, path, payload bytes, headers, status, field, substring of the message)
CASES = [
    ("invalid json", "/v1/classify", raw('{"texts": ['), JSON, 422, "body", "not valid JSON"),
    ("trailing garbage", "/v1/classify", raw('{"texts": ["a"]} x'), JSON, 422, "body", "not valid JSON"),
    ("empty body", "/v1/classify", b"", JSON, 422, "body", "missing"),
    (
        "text/plain",
        "/v1/classify",
        body({"texts": ["a"]}),
        {"content-type": "text/plain"},
        415,
        "content-type",
        "application/json",
    ),
    ("no content type", "/v1/classify", body({"texts": ["a"]}), {}, 415, "content-type", "none given"),
    (
        "form encoded",
        "/v1/classify",
        b"texts=a",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "content-type",
        "application/json",
    ),
    ("body is a list", "/v1/classify", body(["a"]), JSON, 422, "body", "JSON object"),
    ("body is a string", "/v1/classify", body("a"), JSON, 422, "body", "JSON object"),
    ("body is null", "/v1/classify", raw("null"), JSON, 422, "body", ""),
    ("missing texts", "/v1/classify", body({"budget": 0.5}), JSON, 422, "texts", "required"),
    ("texts is a string", "/v1/classify", body({"texts": "a"}), JSON, 422, "texts", "list"),
    ("texts is a number", "/v1/classify", body({"texts": 3}), JSON, 422, "texts", "list"),
    ("texts empty", "/v1/classify", body({"texts": []}), JSON, 422, "texts", "at least 1"),
    ("text is a number", "/v1/classify", body({"texts": [1]}), JSON, 422, "texts[0]", "string"),
    ("text is null", "/v1/classify", body({"texts": ["a", None]}), JSON, 422, "texts[1]", "string"),
    ("text is a list", "/v1/classify", body({"texts": [["a"]]}), JSON, 422, "texts[0]", "string"),
    ("empty text", "/v1/classify", body({"texts": [""]}), JSON, 422, "texts[0]", "empty"),
    ("blank text", "/v1/classify", body({"texts": ["ok", " \n\t "]}), JSON, 422, "texts[1]", "empty"),
    ("huge text", "/v1/classify", body({"texts": ["word " * 600]}), JSON, 422, "texts[0]", "at most 2000"),
    ("too many texts", "/v1/classify", body({"texts": ["a"] * 9}), JSON, 422, "texts", "too many"),
    ("budget NaN", "/v1/classify", raw('{"texts": ["a"], "budget": NaN}'), JSON, 422, "budget", "(0, 1]"),
    (
        "budget Infinity",
        "/v1/classify",
        raw('{"texts": ["a"], "budget": Infinity}'),
        JSON,
        422,
        "budget",
        "(0, 1]",
    ),
    (
        "budget -Infinity",
        "/v1/classify",
        raw('{"texts": ["a"], "budget": -Infinity}'),
        JSON,
        422,
        "budget",
        "(0, 1]",
    ),
    ("budget 1e400", "/v1/classify", raw('{"texts": ["a"], "budget": 1e400}'), JSON, 422, "budget", "(0, 1]"),
    ("budget 0", "/v1/classify", body({"texts": ["a"], "budget": 0}), JSON, 422, "budget", "(0, 1]"),
    (
        "budget negative",
        "/v1/classify",
        body({"texts": ["a"], "budget": -0.5}),
        JSON,
        422,
        "budget",
        "(0, 1]",
    ),
    ("budget > 1", "/v1/classify", body({"texts": ["a"], "budget": 1.5}), JSON, 422, "budget", "(0, 1]"),
    ("budget true", "/v1/classify", body({"texts": ["a"], "budget": True}), JSON, 422, "budget", "bool"),
    ("budget string", "/v1/classify", body({"texts": ["a"], "budget": "0.5"}), JSON, 422, "budget", "str"),
    (
        "budget below the model's floor",
        "/v1/classify",
        body({"texts": ["a"], "budget": 0.01}),
        JSON,
        422,
        "budget",
        "smallest budget",
    ),
    (
        "budget tiny denormal",
        "/v1/classify",
        body({"texts": ["a"], "budget": 5e-324}),
        JSON,
        422,
        "budget",
        "smallest budget",
    ),
    (
        "budget list too short",
        "/v1/classify",
        body({"texts": ["a", "b"], "budget": [0.5]}),
        JSON,
        422,
        "budget",
        "1 entries for 2 texts",
    ),
    (
        "budget list too long",
        "/v1/classify",
        body({"texts": ["a"], "budget": [0.5, 0.5]}),
        JSON,
        422,
        "budget",
        "2 entries for 1 texts",
    ),
    ("budget list empty", "/v1/classify", body({"texts": ["a"], "budget": []}), JSON, 422, "budget", "empty"),
    (
        "budget list bad element",
        "/v1/classify",
        body({"texts": ["a", "b"], "budget": [0.5, 2]}),
        JSON,
        422,
        "budget",
        "budget[1]",
    ),
    (
        "budget list boolean element",
        "/v1/classify",
        body({"texts": ["a", "b"], "budget": [0.5, False]}),
        JSON,
        422,
        "budget",
        "budget[1]",
    ),
    (
        "budget object unknown key",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"mean": 0.3, "x": 1}}),
        JSON,
        422,
        "budget",
        "unknown keys",
    ),
    (
        "budget object without mean",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"cap": 0.3}}),
        JSON,
        422,
        "budget",
        "needs 'mean'",
    ),
    (
        "budget object cap < mean",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"mean": 0.5, "cap": 0.3}}),
        JSON,
        422,
        "budget",
        "cap",
    ),
    ("NUL character", "/v1/classify", body({"texts": ["bad\u0000text"]}), JSON, 422, "texts[0]", "U+0000"),
    (
        "escape character",
        "/v1/classify",
        body({"texts": ["ok", "\u001b[31mred"]}),
        JSON,
        422,
        "texts[1]",
        "U+001B",
    ),
    (
        "lone surrogate",
        "/v1/classify",
        raw('{"texts": ["bad \\ud800 text"]}'),
        JSON,
        422,
        "texts[0]",
        "surrogate",
    ),
    ("invalid UTF-8", "/v1/classify", b'{"texts": ["bad \xff\xfe text"]}', JSON, 400, "body", "UTF-8"),
    ("latin-1 body", "/v1/classify", '{"texts": ["café"]}'.encode("latin-1"), JSON, 400, "body", "UTF-8"),
    (
        "unknown field",
        "/v1/classify",
        body({"texts": ["a"], "temperature": 1}),
        JSON,
        422,
        "temperature",
        "unknown field",
    ),
    (
        "oversized body",
        "/v1/classify",
        body({"texts": ["a"], "pad": "x" * 70_000}),
        JSON,
        413,
        "body",
        "exceeds 65536",
    ),
    (
        "deeply nested JSON",
        "/v1/classify",
        raw('{"texts": ' + "[" * 20_000 + "]" * 20_000 + "}"),
        JSON,
        400,
        "body",
        "nested",
    ),
    (
        "generate: max_new_tokens negative",
        "/v1/generate",
        body({"prompt": "hi", "max_new_tokens": -1}),
        JSON,
        422,
        "max_new_tokens",
        "greater than or equal to 1",
    ),
    (
        "generate: max_new_tokens huge",
        "/v1/generate",
        body({"prompt": "hi", "max_new_tokens": 10**9}),
        JSON,
        422,
        "max_new_tokens",
        "less than or equal to 4096",
    ),
    (
        "generate: max_new_tokens string",
        "/v1/generate",
        body({"prompt": "hi", "max_new_tokens": "5"}),
        JSON,
        422,
        "max_new_tokens",
        "integer",
    ),
    (
        "generate: missing prompt",
        "/v1/generate",
        body({"max_new_tokens": 5}),
        JSON,
        422,
        "prompt",
        "required",
    ),
    (
        "generate: temperature NaN",
        "/v1/generate",
        raw('{"prompt": "hi", "temperature": NaN}'),
        JSON,
        422,
        "temperature",
        "finite",
    ),
    (
        "generate: budget > 1",
        "/v1/generate",
        body({"prompt": "hi", "budget": 2}),
        JSON,
        422,
        "budget",
        "(0, 1]",
    ),
    (
        "completions: max_tokens 0",
        "/v1/completions",
        body({"prompt": "hi", "max_tokens": 0}),
        JSON,
        422,
        "max_tokens",
        "greater than or equal to 1",
    ),
    (
        "completions: n > 1",
        "/v1/completions",
        body({"prompt": "hi", "n": 2}),
        JSON,
        422,
        "n",
        "less than or equal to 1",
    ),
]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_corpus_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("name", "path", "payload", "headers", "status", "field", "says"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_gets_json_4xx_naming_the_field(client, name, path, payload, headers, status, field, says):
    r = client.post(path, content=payload, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["field"] == field, err
    assert err["message"] and says.lower() in err["message"].lower(), err


def test_mean_budget_form_is_refused_clearly_without_the_library_mode(client):
    r = client.post("/v1/classify", json={"texts": ["a"], "budget": {"mean": 0.3, "cap": 0.6}})
    import dynprune

    if getattr(dynprune, "MeanBudget", None) is None:
        assert r.status_code == 422
        assert r.json()["error"]["field"] == "budget" and "mean-budget" in r.json()["error"]["message"]
    else:  # served in a forward of its own; an uncalibrated checkpoint refuses it, naming budget
        assert r.status_code in (200, 422), r.text
        if r.status_code == 200:
            assert len(r.json()["items"]) == 1
        else:
            assert r.json()["error"]["field"] == "budget"


def test_wrong_method_and_unknown_path_are_json_errors(client):
    r = client.get("/v1/classify")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = client.post("/v1/nothing", json={})
    assert r.status_code == 404 and "/docs" in r.json()["error"]["message"]


def test_server_answers_correctly_after_the_corpus(client, engine):
    for _, path, payload, headers, *_ in CASES:  # the whole corpus again, then a valid request
        client.post(path, content=payload, headers=headers)
    r = client.post("/v1/classify", json={"texts": [OK_TEXT, "dull"], "budget": [0.5, 1.0]})
    assert r.status_code == 200, r.text
    for item, text, budget in zip(r.json()["items"], [OK_TEXT, "dull"], [0.5, 1.0]):
        ref = engine.classify_alone(text, budget, item["padded_len"])
        assert item["label_id"] == ref.label_id and item["flops_ratio"] == ref.flops_ratio
        assert max(abs(a - b) for a, b in zip(item["scores"], ref.scores)) < 1e-5
    text = client.get("/metrics").text
    assert metric(text, "dynprune_rejections_total", reason="invalid") >= len(CASES)
    assert metric(text, "dynprune_rejections_total", reason="too_large") >= 2
    assert metric(text, "dynprune_rejections_total", reason="error") == 0
