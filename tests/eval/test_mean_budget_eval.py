"""scripts/mean_budget_eval.py: which dense teacher a run's checkpoints are compared with."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import load_script


def test_teacher_is_the_shared_one_or_the_runs_own_dense_stage(tmp_path):
    mod = load_script("mean_budget_eval")
    run = tmp_path / "seed0" / "static"
    shared = {"model": {"path": None, "teacher_path": "runs/quick/dense"}}
    assert mod.teacher_dir(shared, run) == Path("runs/quick/dense")
    # `dynprune train` with stages [dense, gated, static]: teacher_path is null, the run has dense/
    own = {"model": {"path": None, "teacher_path": None}}
    assert mod.teacher_dir(own, run) == run / "dense"
    assert mod.teacher_dir({}, run) == run / "dense"


def test_quartiles_hold_a_quarter_of_the_inputs_even_when_keys_tie():
    import numpy as np

    quartile_means = load_script("mean_budget_eval").quartile_means
    lengths = np.array([128] * 6 + [40, 50])  # most texts truncated to the same length
    flops = np.arange(8, dtype=float)
    got = quartile_means(lengths, flops)
    assert not np.isnan(got).any() and got[0] == 6.5  # the two short texts first (flops 6 and 7)
    assert got[1:] == [0.5, 2.5, 4.5]  # then the tied ones in test-set order
