"""MeanGovernor: a mean-budget knob corrected online so the running mean lands on the target."""

import numpy as np
import pytest

from dynprune.governor import MeanGovernor


def _linear_policy(shift: float):
    """A policy whose knob is the FLOPs it should spend: on the calibration inputs a knob k spends
    exactly k; the inputs being served spend k + shift (noisy per input)."""

    def solve(aim: float) -> tuple[float, float]:
        return aim, aim

    def spend(knob: float, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.clip(knob + shift + rng.normal(0, 0.05, n), 0, None)

    return solve, spend


@pytest.mark.parametrize("shift", [-0.03, 0.0, 0.04])
def test_a_constant_shift_is_cancelled_and_the_mean_lands_on_the_target(shift):
    solve, spend = _linear_policy(shift)
    rng = np.random.default_rng(0)
    gov = MeanGovernor(0.25, solve, bounds=(0.05, 1.0), prior=0)
    assert gov.knob == gov.calibrated_knob == 0.25 and gov.mean_spent is None
    for _ in range(40):
        gov.observe(spend(gov.knob, rng, 64))
    assert gov.seen == 40 * 64
    assert gov.mean_spent == pytest.approx(0.25, rel=0.01)  # within 1 % of the target
    assert gov.bias == pytest.approx(shift, abs=0.005)
    assert gov.knob == pytest.approx(0.25 - gov.bias)
    # without the governor the calibrated knob misses by the shift (4 % of dense = 16 % of the target)
    fixed = np.mean([spend(gov.calibrated_knob, rng, 64).mean() for _ in range(40)])
    assert fixed == pytest.approx(0.25 + shift, abs=0.005)


def test_the_aim_stays_inside_the_bounds():
    solve, spend = _linear_policy(0.5)  # the inputs spend far more than the calibration allows
    asked = []

    def recording(aim: float) -> tuple[float, float]:
        asked.append(aim)
        return solve(aim)

    rng = np.random.default_rng(1)
    gov = MeanGovernor(0.25, recording, bounds=(0.1, 0.9), prior=0)
    for _ in range(5):
        gov.observe(spend(gov.knob, rng, 8))
    assert min(asked) == pytest.approx(0.1) and max(asked) <= 0.9
    assert gov.knob == pytest.approx(0.1)  # as cheap as it can go


def test_frozen_governor_keeps_its_knob():
    solve, spend = _linear_policy(0.05)
    rng = np.random.default_rng(2)
    gov = MeanGovernor(0.5, solve, bounds=(0.0, 1.0))
    gov.observe(spend(gov.knob, rng, 16))
    knob, seen = gov.knob, gov.seen
    gov.freeze()
    gov.observe(spend(gov.knob, rng, 16))
    assert gov.knob == knob and gov.seen == seen and not gov.learning


@pytest.mark.parametrize(
    ("target", "bounds", "message"),
    [
        (0.0, (0.0, 1.0), "target"),
        (float("nan"), (0.0, 1.0), "target"),
        (0.5, (0.6, 0.4), "bounds"),
        (0.5, (-0.1, 1.0), "bounds"),
        (0.5, (0.0, float("inf")), "bounds"),
    ],
)
def test_bad_settings_are_refused(target, bounds, message):
    with pytest.raises(ValueError, match=message):
        MeanGovernor(target, lambda aim: (aim, aim), bounds)
    with pytest.raises(ValueError, match="prior"):
        MeanGovernor(0.5, lambda aim: (aim, aim), (0.0, 1.0), prior=-1)


def test_the_prior_keeps_one_unusual_batch_from_swinging_the_knob():
    """No shift, but the first batch happens to spend 0.1 more (short or long inputs, say)."""
    for prior, moved in ((0, 0.1), (128, 0.1 * 64 / (64 + 128))):
        gov = MeanGovernor(0.25, lambda aim: (aim, aim), (0.0, 1.0), prior=prior)
        gov.observe(np.full(64, 0.35))
        assert gov.bias == pytest.approx(moved) and gov.knob == pytest.approx(0.25 - moved)
    # over a long stream the prior weighs little: a constant shift is still found
    gov = MeanGovernor(0.25, lambda aim: (aim, aim), (0.0, 1.0))
    for _ in range(200):
        gov.observe(np.full(64, gov.knob + 0.02))
    assert gov.bias == pytest.approx(0.02, rel=0.02)


@pytest.mark.parametrize("batch", [[], [0.2, float("nan")], [0.2, -0.1]])
def test_bad_batches_are_refused_and_change_nothing(batch):
    gov = MeanGovernor(0.5, lambda aim: (aim, aim), (0.0, 1.0))
    with pytest.raises(ValueError, match="finite FLOPs ratios"):
        gov.observe(np.array(batch))
    assert gov.seen == 0 and gov.knob == 0.5
