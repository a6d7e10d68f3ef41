"""gate.budget_mode=mean end to end on a tiny model: the Lagrangian on the batch-mean FLOPs,
threshold calibration saved with the gates, and MeanBudget landing on its target."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dynprune.train.cli import main
from dynprune.train.config import DataConfig
from dynprune.train.data import Collator, encode, eval_batches, load_task_data

import dynprune
from dynprune.calibration_fit import fit
from tests.train.test_resume import tiny_run_args
from tests.train.tiny import sentiment_rows, tiny_model_dir, write_csv


@pytest.fixture(scope="module")
def mean_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mean")
    model, data = tiny_model_dir(root / "model"), write_csv(root / "data.csv", sentiment_rows(240))
    out = root / "run"
    args = tiny_run_args(
        model, data, out, "--gate.budget_mode=mean", "--evaluation.budgets=[0.4]", "--gate.budget_min=0.3",
        "--optim.gated_epochs=3", "--checkpoint.every_steps=1000",
    )  # fmt: skip
    assert main(args) == 0
    return out, data


def _batches(data, split, tokenizer, size=32):
    task = load_task_data(DataConfig(path=str(data)))
    ex = encode(task, tokenizer, 64)[split]
    collate = Collator(tokenizer.pad_token_id)
    return [collate([ex[i] for i in b]) for b in eval_batches(ex, size)]


def test_mean_mode_checkpoint_is_marked_and_calibrated(mean_run):
    out, _ = mean_run
    gated, _ = dynprune.load_gated_model(out / "gated")
    assert gated.gate_config.budget_mode == "mean"
    saved = json.loads((out / "gated" / "gates" / "calibration.json").read_text())
    assert saved["entries"]["mean:0.4"]["policy"] == "threshold"
    assert "mean:0.4" in gated.calibration.entries
    metrics = json.loads((out / "gated" / "metrics.json").read_text())
    assert abs(metrics["validation"]["flops_ratio@0.4"] - 0.4) <= 0.02 * 0.4


def test_threshold_calibration_lands_on_target_and_inputs_differ(mean_run):
    out, data = mean_run
    gated, tok = dynprune.load_gated_model(out / "gated")
    val = _batches(data, "validation", tok)
    for target in (0.3, 0.5):
        budget = dynprune.MeanBudget(target)
        gated.calibration.add(fit(gated, val, budget))
        ratios = []
        with torch.no_grad():
            for b in val:
                gated(input_ids=b["input_ids"], attention_mask=b["attention_mask"], budget=budget)
                ratios.append(gated.last.flops_ratio)
        r = torch.cat(ratios).numpy()
        # 24 validation inputs of a 2-layer model: FLOPs come in coarse steps (the +-2 % check on
        # more inputs is tests/core/test_mean_budget.py); the mean never exceeds the target
        assert target * 0.95 <= r.mean() <= target * (1 + 1e-9), (r.mean(), target)
        assert np.ptp(r) > 0  # the router gives inputs different amounts


def test_threshold_policy_refused_on_a_cap_checkpoint():
    from tests.helpers import tiny_batch, tiny_model

    gated = dynprune.wrap(tiny_model("bert", layers=2), dynprune.GateConfig(ffn_slice_size=32)).eval()
    b = tiny_batch(batch=4, seq=8)
    b["labels"] = torch.zeros(4, dtype=torch.long)
    with pytest.raises(dynprune.BudgetModeError, match="budget_mode=mean"):
        fit(gated, [b], dynprune.MeanBudget(0.5), policy="threshold")
