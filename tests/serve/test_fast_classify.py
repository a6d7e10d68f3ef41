"""FastClassify answers plain classify POSTs itself, exactly as the FastAPI route would, and hands
everything else (body replayed) to the app."""

from __future__ import annotations

import asyncio
import json

import pytest

from dynprune.serve import ServeConfig
from dynprune.serve.fast_classify import FastClassify
from dynprune.serve.routes.classify import response_of
from dynprune.serve.runtime import Runtime


class Inner:
    """The FastAPI app's stand-in: records what reached it and answers 299."""

    def __init__(self):
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _call(app, body: bytes, path: str = "/v1/classify", method: str = "POST"):
    """(status, headers, body) of one request through ``app`` (the layer and its event loop)."""
    fast, loop = app
    scope = {"type": "http", "method": method, "path": path, "headers": []}
    out: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        out.append(message)

    loop.run_until_complete(fast(scope, receive, send))
    return out[0]["status"], dict(out[0]["headers"]), out[1]["body"]


@pytest.fixture()
def layer(engine):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    rt = Runtime(engine, ServeConfig(max_batch=8, max_texts=8, max_queue=64, max_wait_ms=1))

    async def start():
        rt.batcher.start()

    loop.run_until_complete(start())
    inner = Inner()
    yield (FastClassify(inner, rt), loop), inner, rt
    loop.run_until_complete(rt.batcher.close())
    loop.close()
    asyncio.set_event_loop(None)


TEXTS = ["a gripping, funny and warm film", "dull", "the plot never quite comes together"]


def test_a_plain_request_is_answered_here_as_the_route_answers_it(layer, engine):
    app, inner, rt = layer
    for budget in (0.5, [1.0, 0.4, 0.7], None):
        status, headers, body = _call(app, json.dumps({"texts": TEXTS, "budget": budget}).encode())
        assert status == 200 and inner.bodies == []
        assert headers[b"content-type"] == b"application/json" and int(headers[b"content-length"]) == len(
            body
        )
        got = json.loads(body)
        budgets = [budget] * 3 if not isinstance(budget, list) else budget
        budgets = [1.0 if b is None else b for b in budgets]  # the model's default budget
        assert [it["budget"] for it in got["items"]] == budgets
        padded = got["items"][0]["padded_len"]
        want = [engine.classify_alone(t, b, padded) for t, b in zip(TEXTS, budgets)]
        expected = json.loads(response_of(rt, want, budgets).model_dump_json())
        for g, w in zip(got["items"], expected["items"]):
            assert {k: v for k, v in g.items() if k != "scores"} == {
                k: v for k, v in w.items() if k != "scores"
            }
            assert max(abs(a - b) for a, b in zip(g["scores"], w["scores"])) < 1e-5


@pytest.mark.parametrize(
    "body",
    [
        b'{"texts": []}',  # invalid: the app's 422
        b'{"texts": ["a"], "budget": {"mean": 0.5}}',  # a budget object: the route's group path
        b'{"texts": ["a"], "budget": 1e-9}',  # below the model's floor: the route's 422
        b'{"texts": ["a"] , "extra": 1}',
        b"[1, 2",
        json.dumps({"texts": ["x"] * 9}).encode(),  # more texts than --max-texts
    ],
)
def test_anything_else_reaches_the_app_with_its_body(layer, body):
    app, inner, _ = layer
    assert _call(app, body)[0] == 299 and inner.bodies == [body]


def test_other_paths_and_a_draining_server_reach_the_app(layer):
    app, inner, rt = layer
    assert _call(app, b"{}", path="/v1/generate")[0] == 299
    assert _call(app, b"", path="/v1/classify", method="GET")[0] == 299
    rt.draining = True
    assert _call(app, b'{"texts": ["a"]}')[0] == 299
    assert len(inner.bodies) == 3
