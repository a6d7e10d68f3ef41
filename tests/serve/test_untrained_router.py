"""`--model` wraps a plain model with an UNTRAINED router: the server serves budget 1.0 (the original
model) and refuses lower budgets with a 422 that says how to get trained gates, unless it was started
with --untrained-budgets (smoke tests; exercised by test_generate.py's impatient server)."""

from __future__ import annotations

import httpx
import pytest

from dynprune.serve.ray_app import _parse
from tests.serve.server import ServerProcess
from tests.serve.test_startup import refuse


@pytest.fixture(scope="module")
def plain_server(tiny_model_dir, tmp_path_factory):
    """A tiny BERT classifier as a plain model; its FFN width (64) is not a multiple of the default
    slice size (128): --model picks a slice size that divides it."""
    log = tmp_path_factory.mktemp("serve-log") / "plain.log"
    options = ("--max-texts", "4", "--max-queue", "16", "--max-batch", "4")
    proc = ServerProcess(["--model", str(tiny_model_dir)], *options, log=log)
    yield proc.wait_ready()
    assert proc.stop() == 0, proc.log()


def test_health_says_the_router_is_untrained(plain_server):
    body = httpx.get(f"{plain_server.url}/health").json()
    assert body["trained_router"] is False
    assert "only budget 1.0" in plain_server.log()  # the startup note


@pytest.mark.parametrize(
    ("budget", "field"),
    [
        (0.5, "budget"),
        ([1.0, 0.9], "budget[1]"),
        (0.999, "budget"),
        ({"ms": 4}, "budget"),
        ({"mean": 0.5}, "budget"),
    ],
)
def test_budgets_below_one_are_refused_with_the_way_to_trained_gates(plain_server, budget, field):
    texts = ["a fine film", "dull"] if isinstance(budget, list) else ["a fine film"]
    r = httpx.post(f"{plain_server.url}/v1/classify", json={"texts": texts, "budget": budget})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field and "untrained" in err["message"] and "--checkpoint" in err["message"]


def test_budget_one_and_the_default_are_served(plain_server):
    for body in ({"texts": ["a fine film"], "budget": 1.0}, {"texts": ["a fine film", "dull"]}):
        r = httpx.post(f"{plain_server.url}/v1/classify", json=body)
        assert r.status_code == 200, r.text
        assert all(item["flops_ratio"] == 1.0 for item in r.json()["items"])


def test_untrained_budgets_flag_is_for_model_only(capsys, tiny_checkpoint):
    code, err = refuse(capsys, "--checkpoint", str(tiny_checkpoint), "--untrained-budgets")
    assert code == 2 and "--untrained-budgets is for --model" in err


def test_ray_builder_parses_booleans():
    assert _parse(bool, "untrained_budgets", "false") is False
    assert _parse(bool, "untrained_budgets", "True") is True
    assert _parse(int, "max_batch", "8") == 8
    with pytest.raises(ValueError, match="true or false"):
        _parse(bool, "untrained_budgets", "maybe")
