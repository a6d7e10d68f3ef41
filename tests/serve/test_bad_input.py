"""The bad-input corpus: every case gets a 4xx JSON error naming the field and what is wrong,
and the server still answers a valid request correctly afterwards (a real server process)."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.bad_input import BadInput, body, check_corpus, check_refused, raw, send_all
from tests.serve.server import metric

OK_TEXT = "a fine film"

CASES = [
    BadInput("invalid json", "/v1/classify", raw('{"texts": ['), 422, "body", "not valid JSON"),
    BadInput("trailing garbage", "/v1/classify", raw('{"texts": ["a"]} x'), 422, "body", "not valid JSON"),
    BadInput("empty body", "/v1/classify", b"", 422, "body", "missing"),
    BadInput(
        "text/plain",
        "/v1/classify",
        body({"texts": ["a"]}),
        415,
        "content-type",
        "application/json",
        headers={"content-type": "text/plain"},
    ),
    BadInput(
        "no content type",
        "/v1/classify",
        body({"texts": ["a"]}),
        415,
        "content-type",
        "none given",
        headers={},
    ),
    BadInput(
        "form encoded",
        "/v1/classify",
        b"texts=a",
        415,
        "content-type",
        "application/json",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    BadInput("body is a list", "/v1/classify", body(["a"]), 422, "body", "JSON object"),
    BadInput("body is a string", "/v1/classify", body("a"), 422, "body", "JSON object"),
    BadInput("body is null", "/v1/classify", raw("null"), 422, "body", ""),
    BadInput("missing texts", "/v1/classify", body({"budget": 0.5}), 422, "texts", "required"),
    BadInput("texts is a string", "/v1/classify", body({"texts": "a"}), 422, "texts", "list"),
    BadInput("texts is a number", "/v1/classify", body({"texts": 3}), 422, "texts", "list"),
    BadInput("texts empty", "/v1/classify", body({"texts": []}), 422, "texts", "at least 1"),
    BadInput("text is a number", "/v1/classify", body({"texts": [1]}), 422, "texts[0]", "string"),
    BadInput("text is null", "/v1/classify", body({"texts": ["a", None]}), 422, "texts[1]", "string"),
    BadInput("text is a list", "/v1/classify", body({"texts": [["a"]]}), 422, "texts[0]", "string"),
    BadInput("empty text", "/v1/classify", body({"texts": [""]}), 422, "texts[0]", "empty"),
    BadInput("blank text", "/v1/classify", body({"texts": ["ok", " \n\t "]}), 422, "texts[1]", "empty"),
    BadInput("huge text", "/v1/classify", body({"texts": ["word " * 600]}), 422, "texts[0]", "at most 2000"),
    BadInput("too many texts", "/v1/classify", body({"texts": ["a"] * 9}), 422, "texts", "too many"),
    BadInput("budget NaN", "/v1/classify", raw('{"texts": ["a"], "budget": NaN}'), 422, "budget", "(0, 1]"),
    BadInput(
        "budget Infinity",
        "/v1/classify",
        raw('{"texts": ["a"], "budget": Infinity}'),
        422,
        "budget",
        "(0, 1]",
    ),
    BadInput(
        "budget -Infinity",
        "/v1/classify",
        raw('{"texts": ["a"], "budget": -Infinity}'),
        422,
        "budget",
        "(0, 1]",
    ),
    BadInput(
        "budget 1e400", "/v1/classify", raw('{"texts": ["a"], "budget": 1e400}'), 422, "budget", "(0, 1]"
    ),
    BadInput("budget 0", "/v1/classify", body({"texts": ["a"], "budget": 0}), 422, "budget", "(0, 1]"),
    BadInput(
        "budget negative", "/v1/classify", body({"texts": ["a"], "budget": -0.5}), 422, "budget", "(0, 1]"
    ),
    BadInput("budget > 1", "/v1/classify", body({"texts": ["a"], "budget": 1.5}), 422, "budget", "(0, 1]"),
    BadInput("budget true", "/v1/classify", body({"texts": ["a"], "budget": True}), 422, "budget", "bool"),
    BadInput("budget string", "/v1/classify", body({"texts": ["a"], "budget": "0.5"}), 422, "budget", "str"),
    BadInput(
        "budget below the model's floor",
        "/v1/classify",
        body({"texts": ["a"], "budget": 0.01}),
        422,
        "budget",
        "smallest budget",
    ),
    BadInput(
        "budget tiny denormal",
        "/v1/classify",
        body({"texts": ["a"], "budget": 5e-324}),
        422,
        "budget",
        "smallest budget",
    ),
    BadInput(
        "budget list too short",
        "/v1/classify",
        body({"texts": ["a", "b"], "budget": [0.5]}),
        422,
        "budget",
        "1 entries for 2 texts",
    ),
    BadInput(
        "budget list too long",
        "/v1/classify",
        body({"texts": ["a"], "budget": [0.5, 0.5]}),
        422,
        "budget",
        "2 entries for 1 texts",
    ),
    BadInput(
        "budget list empty", "/v1/classify", body({"texts": ["a"], "budget": []}), 422, "budget", "empty"
    ),
    BadInput(
        "budget list bad element",
        "/v1/classify",
        body({"texts": ["a", "b"], "budget": [0.5, 2]}),
        422,
        "budget",
        "budget[1]",
    ),
    BadInput(
        "budget list boolean element",
        "/v1/classify",
        body({"texts": ["a", "b"], "budget": [0.5, False]}),
        422,
        "budget",
        "budget[1]",
    ),
    BadInput(
        "budget object unknown key",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"mean": 0.3, "x": 1}}),
        422,
        "budget",
        "unknown keys",
    ),
    BadInput(
        "budget object without mean",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"cap": 0.3}}),
        422,
        "budget",
        "needs 'mean'",
    ),
    BadInput(
        "budget object cap < mean",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"mean": 0.5, "cap": 0.3}}),
        422,
        "budget",
        "cap",
    ),
    BadInput(
        "time budget zero", "/v1/classify", body({"texts": ["a"], "budget": {"ms": 0}}), 422, "budget", "ms"
    ),
    BadInput(
        "time budget as a string",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"ms": "4"}}),
        422,
        "budget",
        "ms",
    ),
    BadInput(
        "time budget beside a mean",
        "/v1/classify",
        body({"texts": ["a"], "budget": {"ms": 4, "mean": 0.3}}),
        422,
        "budget",
        "alone",
    ),
    BadInput("NUL character", "/v1/classify", body({"texts": ["bad\u0000text"]}), 422, "texts[0]", "U+0000"),
    BadInput(
        "escape character",
        "/v1/classify",
        body({"texts": ["ok", "\u001b[31mred"]}),
        422,
        "texts[1]",
        "U+001B",
    ),
    BadInput(
        "lone surrogate", "/v1/classify", raw('{"texts": ["bad \\ud800 text"]}'), 422, "texts[0]", "surrogate"
    ),
    BadInput("invalid UTF-8", "/v1/classify", b'{"texts": ["bad \xff\xfe text"]}', 400, "body", "UTF-8"),
    BadInput("latin-1 body", "/v1/classify", '{"texts": ["café"]}'.encode("latin-1"), 400, "body", "UTF-8"),
    BadInput(
        "unknown field",
        "/v1/classify",
        body({"texts": ["a"], "temperature": 1}),
        422,
        "temperature",
        "unknown field",
    ),
    BadInput(
        "oversized body",
        "/v1/classify",
        body({"texts": ["a"], "pad": "x" * 70_000}),
        413,
        "body",
        "exceeds 65536",
    ),
    BadInput(
        "deeply nested JSON",
        "/v1/classify",
        raw('{"texts": ' + "[" * 20_000 + "]" * 20_000 + "}"),
        400,
        "body",
        "nested",
    ),
    BadInput(
        "generate: max_new_tokens negative",
        "/v1/generate",
        body({"prompt": "hi", "max_new_tokens": -1}),
        422,
        "max_new_tokens",
        "greater than or equal to 1",
    ),
    BadInput(
        "generate: max_new_tokens huge",
        "/v1/generate",
        body({"prompt": "hi", "max_new_tokens": 10**9}),
        422,
        "max_new_tokens",
        "less than or equal to 4096",
    ),
    BadInput(
        "generate: max_new_tokens string",
        "/v1/generate",
        body({"prompt": "hi", "max_new_tokens": "5"}),
        422,
        "max_new_tokens",
        "integer",
    ),
    BadInput(
        "generate: missing prompt", "/v1/generate", body({"max_new_tokens": 5}), 422, "prompt", "required"
    ),
    BadInput(
        "generate: temperature NaN",
        "/v1/generate",
        raw('{"prompt": "hi", "temperature": NaN}'),
        422,
        "temperature",
        "finite",
    ),
    BadInput(
        "generate: budget > 1", "/v1/generate", body({"prompt": "hi", "budget": 2}), 422, "budget", "(0, 1]"
    ),
    BadInput(
        "completions: max_tokens 0",
        "/v1/completions",
        body({"prompt": "hi", "max_tokens": 0}),
        422,
        "max_tokens",
        "greater than or equal to 1",
    ),
    BadInput(
        "completions: n > 1",
        "/v1/completions",
        body({"prompt": "hi", "n": 2}),
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
    check_corpus(CASES, at_least=30)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_json_4xx_naming_the_field(client, case):
    check_refused(client, case)


def test_mean_budget_on_an_uncalibrated_checkpoint_is_refused_saying_how_to_calibrate(client):
    r = client.post("/v1/classify", json={"texts": ["a"], "budget": {"mean": 0.3, "cap": 0.6}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "budget", err
    assert "no calibration for mean:0.3,cap:0.6" in err["message"] and "dynprune calibrate" in err["message"]


def test_time_budget_without_a_cost_table_is_refused_saying_how_to_calibrate(client):
    r = client.post("/v1/classify", json={"texts": ["a"], "budget": {"ms": 4}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "budget" and "dynprune bench calibrate" in err["message"], err


def test_wrong_method_and_unknown_path_are_json_errors(client):
    r = client.get("/v1/classify")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"
    r = client.post("/v1/nothing", json={})
    assert r.status_code == 404 and "/docs" in r.json()["error"]["message"]


def test_server_answers_correctly_after_the_corpus(client, engine):
    send_all(client, CASES)  # the whole corpus again, then a valid request
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
