"""`dynprune serve --govern-mean`: one governor per mean budget, shared by every request that asks for it."""

import numpy as np
import pytest
import torch

import dynprune
from dynprune.calibration_fit import fit

pytest.importorskip("fastapi")

TEXTS = [
    "a quiet, thoughtful film",
    "loud and empty",
    "the best thing this year by far, with a cast that never lets go of you",
    "meh",
    "a long, winding, and ultimately rewarding story about two brothers and a farm",
    "not good",
    "funny",
    "I walked out after an hour of this",
]


@pytest.fixture(scope="module")
def governed_client(tiny_checkpoint):
    from fastapi.testclient import TestClient

    from dynprune.serve import ServeConfig, load_engine
    from dynprune.serve.app import create_app

    cfg = ServeConfig(max_batch=8, max_texts=8, max_queue=64, govern_mean=True)
    engine = load_engine(cfg, checkpoint=str(tiny_checkpoint))
    batches = []
    for s in range(3):  # calibration batches: the texts in other orders, labels drawn at random
        order = np.random.default_rng(s).permutation(len(TEXTS))
        b = engine.batch_of([TEXTS[i] for i in order])
        b["labels"] = torch.randint(0, 2, (len(TEXTS),), generator=torch.Generator().manual_seed(s))
        batches.append(b)
    engine.gated.calibration.add(fit(engine.gated, batches, dynprune.MeanBudget(0.5), trained=(0.2, 1.0)))
    app = create_app(engine, cfg)
    with TestClient(app) as client:
        yield client, app.state.runtime


def test_requests_with_one_mean_budget_share_its_governor(governed_client):
    client, rt = governed_client
    spent = []
    for i in range(3):
        texts = TEXTS[i:] + TEXTS[:i]
        r = client.post("/v1/classify", json={"texts": texts, "budget": {"mean": 0.5}})
        assert r.status_code == 200, r.text
        spent += [res["flops_ratio"] for res in r.json()["items"]]
    gov = rt.governed["mean:0.5"].governor
    assert gov.seen == 3 * len(TEXTS)  # every text of every request
    assert gov.mean_spent == pytest.approx(float(np.mean(spent)), rel=1e-4)
    shown = {  # and /metrics shows it
        line.split("{")[0]: float(line.split()[-1])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("dynprune_governed_") and 'budget="mean:0.5"' in line
    }
    assert shown["dynprune_governed_mean_flops_ratio"] == pytest.approx(gov.mean_spent)
    assert shown["dynprune_governed_knob"] == pytest.approx(gov.knob)


def test_a_mean_budget_without_a_calibration_is_refused_before_it_runs(governed_client):
    client, rt = governed_client
    r = client.post("/v1/classify", json={"texts": ["a"], "budget": {"mean": 0.3}})
    assert r.status_code == 422
    assert "dynprune calibrate" in r.json()["error"]["message"]
    assert "mean:0.3" not in rt.governed
