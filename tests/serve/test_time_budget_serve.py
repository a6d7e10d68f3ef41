"""`{"ms": t}` budgets over HTTP: a checkpoint saved with a cost table serves per-request time
budgets (the texts of the request in a forward of their own, units priced by measured time);
answers equal the in-process engine at the same TimeBudget."""

from __future__ import annotations

import httpx
import pytest
import torch
from dynprune.eval.timing import runtime_env

import dynprune
from dynprune.cost_model import CostTable, SeqCosts, model_signature
from dynprune.serve import ServeConfig, load_engine
from tests.serve.server import ServerProcess

TEXTS = ["a fine film", "dull and far too long", "the plot never comes together"]


@pytest.fixture(scope="module")
def timed_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with a cost table (made-up times: a table measured elsewhere would do)."""
    gated, tokenizer = dynprune.load_gated_model(tiny_checkpoint)
    points = (SeqCosts(4, 1.0, 0.05, 0.02, 0.03), SeqCosts(32, 1.5, 0.1, 0.06, 0.08))
    machine = {"cpu": runtime_env()["cpu"], "threads": str(torch.get_num_threads())}
    gated.cost_table = CostTable(model_signature(gated), points, machine)
    out = tmp_path_factory.mktemp("serve") / "timed-ckpt"
    return dynprune.save_gated_model(gated, out, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def timed_server(timed_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "timed.log"
    options = ("--max-texts", "4", "--max-queue", "16", "--max-batch", "4")
    proc = ServerProcess(["--checkpoint", str(timed_checkpoint)], *options, log=log)
    yield proc.wait_ready()
    assert proc.stop() == 0, proc.log()


def test_time_budgets_are_served_and_equal_the_engine_in_process(timed_checkpoint, timed_server):
    engine = load_engine(
        ServeConfig(max_batch=4, max_texts=4, max_queue=16), checkpoint=str(timed_checkpoint)
    )
    table = engine.gated.cost_table
    seq = int(engine.encode(TEXTS)["input_ids"].shape[1])
    fixed, dense = table.fixed(seq), table.dense(seq)
    ratios = []
    for share in (0.3, 0.7):
        ms = fixed + share * (dense - fixed)
        r = httpx.post(f"{timed_server.url}/v1/classify", json={"texts": TEXTS, "budget": {"ms": ms}})
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        want = engine.classify(TEXTS, dynprune.TimeBudget(ms))
        for item, ref in zip(items, want):
            assert item["budget"] is None and item["label_id"] == ref.label_id
            assert item["flops_ratio"] == pytest.approx(ref.flops_ratio, abs=1e-9) and item["flops_ratio"] < 1
            assert max(abs(a - b) for a, b in zip(item["scores"], ref.scores)) < 1e-5
        ratios.append(sum(i["flops_ratio"] for i in items))
    assert ratios[0] < ratios[1]  # more milliseconds, more units
