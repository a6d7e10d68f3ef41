"""The sweep's statistics: seed aggregation, the paired bootstrap, goal verdicts the data support."""

import numpy as np
import pytest
from dynprune.eval.sweep_config import StatsConfig
from dynprune.eval.sweep_stats import (
    Goal,
    aggregate,
    best_static,
    decode_correct,
    encode_correct,
    flops_lines,
    goals,
    paired_bootstrap,
)


def _point(method, budget, seed, correct, **extra):
    c = np.asarray(correct, dtype=bool)
    return {"method": method, "budget": budget, "seed": seed, "accuracy": float(c.mean()),
            "correct": encode_correct(c), "flops_ratio": budget, **extra}  # fmt: skip


def test_correctness_roundtrips():
    c = np.array([1, 0, 0, 1, 1], dtype=bool)
    assert encode_correct(c) == "10011"
    assert (decode_correct("10011") == c).all()


def test_aggregate_means_and_sample_std_over_seeds():
    pts = [
        _point("dynamic", 0.25, 0, [1, 1, 0, 0], latency_ms_bs1=2.0, notes="first"),
        _point("dynamic", 0.25, 1, [1, 1, 1, 0], latency_ms_bs1=4.0, notes="second"),
        _point("dense", 1.0, 0, [1, 1, 1, 1]),
    ]
    rows = {r["method"]: r for r in aggregate(pts)}
    dyn = rows["dynamic"]
    assert dyn["n_seeds"] == 2 and dyn["seeds"] == [0, 1]
    assert dyn["accuracy"] == pytest.approx(0.625) and dyn["latency_ms_bs1"] == pytest.approx(3.0)
    assert dyn["accuracy_std"] == pytest.approx(np.std([0.5, 0.75], ddof=1))
    assert dyn["notes"] == "first" and "correct" not in dyn
    assert np.isnan(rows["dense"]["accuracy_std"])


def test_paired_bootstrap_sees_a_real_difference_and_pairs_the_examples():
    rng = np.random.default_rng(0)
    n = 2000
    base = rng.random(n) < 0.8
    better = base.copy()
    flip = np.flatnonzero(~base)[:100]  # +5 pt on exactly these examples
    better[flip] = True
    est, lo, hi = paired_bootstrap([better], [base], resamples=2000, confidence=0.95)
    assert est == pytest.approx(5.0)
    assert 0 < lo < est < hi < 10
    # paired: the same predictions differ by nothing, with a zero-width interval
    assert paired_bootstrap([base], [base], 500, 0.95) == (0.0, 0.0, 0.0)
    # an unpaired shuffle of the same accuracy: centred on 0, interval includes it
    other = rng.permutation(base)
    est, lo, hi = paired_bootstrap([other], [base], 2000, 0.95)
    assert est == pytest.approx(0.0) and lo < 0 < hi
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([base[:10]], [base], 10, 0.95)


def test_seed_average_is_per_example():
    a0, a1 = np.array([1, 0, 1, 0], bool), np.array([1, 1, 0, 0], bool)
    b = np.array([0, 0, 0, 0], bool)
    est, _, _ = paired_bootstrap([a0, a1], [b], 200, 0.9)
    assert est == pytest.approx(50.0)


@pytest.mark.parametrize(
    "estimate, low, high, expect",
    [
        (2.0, 0.5, 3.5, "MET (margin +1.00 pt"),
        (1.5, -0.2, 3.0, "NOT SHOWN"),
        (0.4, -0.5, 1.2, "MISSED by 0.60 pt (the interval still reaches the goal: not significant)"),
        (-2.0, -3.0, -1.0, "MISSED by 3.00 pt"),
    ],
)
def test_verdicts_say_only_what_the_interval_supports(estimate, low, high, expect):
    g = Goal("dynamic beats static by >= 1 pt", "x vs y", estimate, low, high, 1.0, 0.0, 0.95)
    assert g.verdict().startswith(expect)
    if expect == "MISSED by 3.00 pt":
        assert g.verdict() == expect
    assert "no verdict" in g.line("quick grid: indicative only (one seed, reduced steps)")
    assert "MET" not in g.line("quick grid: indicative only") and "MISSED" not in g.line("quick grid")
    few = Goal("g", "d", estimate, low, high, 1.0, 0.0, 0.95, missing_seeds="dynamic has 1 seed(s) < 3")
    assert few.verdict() == "no verdict: dynamic has 1 seed(s) < 3"


def _truth_and_noisy(n: int = 400):
    """Ground truth for n examples and ``noisy(p, seed)``: a method right on each with probability p."""
    truth = np.random.default_rng(1).random(n) < 0.8

    def noisy(p, seed):
        r = np.random.default_rng(seed).random(n)
        return np.where(r < p, truth, ~truth)

    return truth, noisy


def test_goals_pick_the_best_static_method_and_count_seeds():
    truth, noisy = _truth_and_noisy()
    pts = [_point("dense", 1.0, 0, truth)]
    for s in range(3):
        pts += [
            _point("dynamic", 0.25, s, noisy(0.95, s)),
            _point("static_gates", 0.25, s, noisy(0.85, 10 + s)),
        ]
        pts += [
            _point("early_exit", 0.25, s, noisy(0.7, 20 + s)),
            _point("dynamic", 0.5, s, noisy(0.99, 30 + s)),
        ]
    pts.append(_point("ln_structured", 0.25, 0, noisy(0.6, 40)))
    assert best_static(pts, 0.25) == "static_gates"
    beat, ee, dense = goals(pts, StatsConfig(resamples=1000))
    assert "static_gates" in beat.detail and "(3 seeds)" in beat.detail
    assert beat.verdict().startswith("MET") and ee.verdict().startswith("MET")
    assert dense.estimate < 0 and dense.goal == -0.5
    # two seeds of a contender: numbers, no verdict
    two = [p for p in pts if not (p["method"] == "dynamic" and p["seed"] == 2)]
    assert (
        goals(two, StatsConfig(resamples=200))[0]
        .verdict()
        .startswith("no verdict: dynamic has 2 seed(s) < 3")
    )
    missing = goals([p for p in pts if p["method"] != "early_exit"], StatsConfig(resamples=200))[1]
    assert "n/a" in missing.line()


def test_goals_judge_the_best_dynamic_mode_and_name_it():
    truth, noisy = _truth_and_noisy()
    pts = [_point("dense", 1.0, 0, truth)]
    for s in range(3):
        pts += [
            _point("dynamic", 0.25, s, noisy(0.7, s)),  # behind static gates
            _point("static_gates", 0.25, s, noisy(0.85, 10 + s)),
            _point("early_exit", 0.25, s, noisy(0.8, 20 + s)),
            _point("static_early_exit", 0.25, s, noisy(0.97, 30 + s)),  # ahead of both
            _point("dynamic", 0.5, s, noisy(0.99, 40 + s)),
            _point("static_early_exit", 0.5, s, noisy(0.9, 50 + s)),
        ]
    beat, ee, dense = goals(pts, StatsConfig(resamples=1000))
    assert beat.text.startswith("dynamic mode static_early_exit beats the best static method")
    assert beat.detail.startswith("static_early_exit") and beat.verdict().startswith("MET")
    assert ee.text.startswith("dynamic mode static_early_exit beats early_exit") and ee.estimate > 0
    assert dense.text.startswith("dynamic within")  # at 50 % the router has the higher mean
    # without the combined mode the router is judged, and it misses
    alone = goals([p for p in pts if p["method"] != "static_early_exit"], StatsConfig(resamples=1000))
    assert alone[0].text.startswith("dynamic beats") and alone[0].estimate < 0


def test_the_equal_steps_control_is_a_static_method_the_goal_is_judged_against():
    truth, noisy = _truth_and_noisy()
    pts = [_point("dense", 1.0, 0, truth)]
    for s in range(3):
        pts += [
            _point("static_gates", 0.25, s, noisy(0.7, 10 + s)),  # under-trained
            _point("static_early_exit", 0.25, s, noisy(0.9, 30 + s)),
            _point("static_gates_ft", 0.25, s, noisy(0.9, 60 + s)),  # the same extra steps, no exits
        ]
    assert best_static(pts, 0.25) == "static_gates_ft"
    beat = goals(pts, StatsConfig(resamples=1000))[0]
    assert "vs static_gates_ft" in beat.detail and not beat.verdict().startswith("MET")
    # without the control, the under-trained static gates make the composed mode look ahead
    without = goals([p for p in pts if p["method"] != "static_gates_ft"], StatsConfig(resamples=1000))[0]
    assert without.verdict().startswith("MET")


def test_flops_goal_lines():
    rows = [{"method": "early_exit", "budget": 0.25, "flops_ratio": 0.246, "flops_ratio_p5": 0.19,
             "flops_ratio_p95": 0.6},
            {"method": "dynamic", "budget": 0.5, "flops_ratio": 0.45}]  # fmt: skip
    lines = flops_lines(rows)
    assert lines[0].endswith("-> MET") and "p95 0.600" in lines[0]
    assert lines[1].endswith("-> MISSED by 8.0 %")
    quick = flops_lines(rows, indicative="quick grid")
    assert quick[1].endswith("-> outside the tolerance (no verdict)") and "MET" not in " ".join(quick)


def test_t_interval_is_the_student_interval_of_the_mean():
    from dynprune.eval.sweep_stats import t_interval

    mean, lo, hi = t_interval([1.0, 2.0, 3.0])  # sd 1, 2 degrees of freedom: t = 4.303
    assert (
        mean == 2.0 and hi - mean == pytest.approx(4.303 / 3**0.5) and mean - lo == pytest.approx(hi - mean)
    )
    assert t_interval([0.5])[0] == 0.5 and all(v != v for v in t_interval([0.5])[1:])  # nan bounds


def test_pareto_plot_leaves_out_speed_panels_nobody_timed_and_wraps_its_goal_lines(tmp_path):
    import matplotlib.image
    from dynprune.eval.report import plot_pareto

    rows = [
        {"method": "dense", "budget": 1.0, "flops_ratio": 1.0, "accuracy": 0.8, "speedup_bs1": 1.0},
        {
            "method": "static_gates",
            "budget": 0.25,
            "flops_ratio": 0.25,
            "accuracy": 0.7,
            "accuracy_std": 0.01,
        },
    ]
    long_goal = "dynamic mode static_early_exit beats the best static method " * 6
    untimed = plot_pareto(rows, tmp_path / "a.png", title="t", goal_lines=[long_goal])
    timed = plot_pareto(
        [*rows[:1], {**rows[1], "speedup_bs1": 2.5, "speedup_bs16": 3.0}], tmp_path / "b.png", title="t"
    )
    one, three = (matplotlib.image.imread(p).shape for p in (untimed, timed))
    assert one[1] < 0.6 * three[1]  # one panel (dense's speedup of 1.0 by definition is not a timing)
    assert one[0] > three[0]  # the long goal line was wrapped onto more lines, not cut off
