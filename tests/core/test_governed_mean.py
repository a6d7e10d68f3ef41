"""Governed mean budgets: the calibrated policy's knob corrected online (dynprune.govern)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynprune
from dynprune import MeanBudget
from dynprune.calibration import Calibration, CalibrationEntry, CascadePolicy, MissingCalibrationError
from dynprune.calibration_fit import fit
from dynprune.governor import curve_solver
from tests.core.test_mean_budget import _batches, _gated, _ratios
from tests.helpers import VOCAB


def _served(n: int, seq: int, vocab: int, batch: int = 16) -> list[dict[str, torch.Tensor]]:
    """Inputs unlike the calibration batches: longer or shorter, from a few tokens only."""
    out = []
    for s in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(100 + s))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.mark.parametrize(
    ("mode", "seq", "vocab"),
    [("mean", 30, 20), ("cap", 14, 20)],  # threshold policy (mean-trained router), cascade (any router)
)
def test_a_governed_mean_lands_where_the_calibrated_policy_misses(mode, seq, vocab):
    gated = _gated(mode=mode)
    budget = MeanBudget(0.4)
    trained = (0.2, 0.9) if mode == "cap" else None
    gated.calibration.add(fit(gated, _batches(6), budget, trained=trained))
    served = _served(16, seq, vocab)
    fixed = float(_ratios(gated, served, budget).mean())
    assert abs(fixed - 0.4) > 0.05 * 0.4  # these inputs spend far more than the calibration's
    governed = dynprune.govern(gated, budget, prior=16)  # a short stream: 16 batches of 16
    got = float(_ratios(gated, served, governed).mean())
    assert abs(got - 0.4) <= 0.02 * 0.4
    assert governed.governor.seen == 16 * 16
    assert governed.governor.mean_spent == pytest.approx(got)
    assert governed.governor.bias > 0


def test_a_governed_forward_runs_the_policy_at_the_governors_knob():
    gated = _gated(mode="cap")
    budget = MeanBudget(0.4)
    entry = fit(gated, _batches(6), budget, trained=(0.2, 0.9))
    gated.calibration.add(entry)
    governed = dynprune.govern(gated, budget)
    governed.governor.knob = 0.0  # re-run nobody: every input at the cascade's first-pass budget
    b = _served(1, 14, VOCAB)[0]
    with torch.no_grad():
        out = gated(**b, budget=governed)
        ratio = gated.last.flops_ratio
        low = gated(**b, budget=entry.policy.low)
    torch.testing.assert_close(out.logits, low.logits)
    torch.testing.assert_close(ratio, gated.last.flops_ratio)
    assert governed.governor.seen == 16  # and it learned from them


def test_the_curve_is_saved_with_the_gates_and_a_calibration_without_one_is_refused(tmp_path):
    gated = _gated(mode="cap")
    budget = MeanBudget(0.4)
    entry = fit(gated, _batches(4), budget, trained=(0.2, 0.9))
    curve = np.asarray(entry.fitted["curve"])
    assert len(curve) >= 10 and [
        entry.policy.confidence,
        pytest.approx(entry.fitted["flops_ratio_mean"]),
    ] in [list(p) for p in curve]
    assert (np.diff(curve[np.argsort(curve[:, 0]), 1]) >= -1e-12).all()  # more re-runs, more FLOPs
    cal = Calibration()
    cal.add(entry)
    cal.save(tmp_path)
    assert Calibration.load(tmp_path).lookup(budget).fitted["curve"] == entry.fitted["curve"]

    gated.calibration.add(CalibrationEntry(budget, CascadePolicy(0.3, 0.6, 0.5), {"n": 64}))
    with pytest.raises(MissingCalibrationError, match=r"no curve.*dynprune calibrate"):
        dynprune.govern(gated, budget)
    with pytest.raises(MissingCalibrationError, match="dynprune calibrate"):
        dynprune.govern(gated, MeanBudget(0.3))
    dense = dynprune.govern(gated, MeanBudget(1.0))  # needs no calibration: runs the model as is
    b = _served(1, 14, VOCAB)[0]
    with torch.no_grad():
        torch.testing.assert_close(gated(**b, budget=dense).logits, gated(**b, budget=1.0).logits)


def test_curve_solver_interpolates_inside_and_clamps_outside():
    solve, bounds = curve_solver([[2.0, 0.2], [0.0, 0.6], [1.0, 0.4]])  # a threshold: FLOPs fall as it rises
    assert bounds == (0.2, 0.6)
    assert solve(0.3) == pytest.approx((1.5, 0.3))
    assert solve(0.9) == pytest.approx((0.0, 0.6))  # as dear as the curve goes
    with pytest.raises(ValueError, match="monotone"):
        curve_solver([[0.0, 0.2], [1.0, 0.5], [2.0, 0.3]])
    with pytest.raises(ValueError, match=">= 2 finite"):
        curve_solver([[0.0, 0.2]])
    with pytest.raises(ValueError, match=">= 2 finite"):
        curve_solver([[0.0, 0.2], [1.0, float("nan")]])
