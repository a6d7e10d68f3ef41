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
