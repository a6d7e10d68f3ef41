"""scripts/mean_budget_eval.py: which dense teacher a run's checkpoints are compared with."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mean_budget_eval.py"


def _module():
    spec = importlib.util.spec_from_file_location("mean_budget_eval", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_teacher_is_the_shared_one_or_the_runs_own_dense_stage(tmp_path):
    mod = _module()
    run = tmp_path / "seed0" / "static"
    shared = {"model": {"path": None, "teacher_path": "runs/quick/dense"}}
    assert mod.teacher_dir(shared, run) == Path("runs/quick/dense")
    # `dynprune train` with stages [dense, gated, static]: teacher_path is null, the run has dense/
    own = {"model": {"path": None, "teacher_path": None}}
    assert mod.teacher_dir(own, run) == run / "dense"
    assert mod.teacher_dir({}, run) == run / "dense"
