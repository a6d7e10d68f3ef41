"""`dynprune sweep`: every method on a tiny training run, resume without recomputation, bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from dynprune.eval import sweep as sweep_mod
from dynprune.eval import sweep_methods
from dynprune.eval.report import COLUMNS, METHODS

REQUIRED = "method,budget,flops_ratio,accuracy,latency_ms_bs1,latency_ms_bs16,speedup_bs1,speedup_bs16,params,disk_bytes"


def _args(run, tmp_path, *extra):
    return [
        f"--training_dir={run}", f"--output_dir={tmp_path / 'out'}", f"--work_dir={tmp_path / 'work'}",
        "--budgets=[0.3,0.5]", "--finetune.steps=2", "--finetune.batch_size=8",
        "--search.candidates=3", "--search.generations=1", "--search.children=2", "--search.population=2",
        "--search.calibration_examples=16", "--structured.iterative_rounds=2", "--structured.neuron_multiple=8",
        "--timing.bs1_inputs=1", "--timing.bs16_batches=1", "--timing.repeats=1", "--timing.warmup=0",
        "--timing.threads=1", "--evaluation.max_examples=24", *extra,
    ]  # fmt: skip


def _rows(out):
    with open(out / "sweep.csv") as f:
        return list(csv.DictReader(f))


class Spy:
    """Counts calls of the real point functions (and can crash one, like a killed process)."""

    def __init__(self, monkeypatch, crash_on=None):
        self.calls = []
        for name, fn in list(sweep_methods.POINTS.items()):
            monkeypatch.setitem(sweep_methods.POINTS, name, self._wrap(name, fn, crash_on))

    def _wrap(self, name, fn, crash_on):
        def call(ctx, budget, seed):
            self.calls.append((name, budget))
            if name == crash_on:
                raise KeyboardInterrupt("simulated crash")
            return fn(ctx, budget, seed)

        return call


def test_sweep_every_method_then_resume_without_recomputing(tiny_run, tmp_path, monkeypatch):
    args = _args(tiny_run, tmp_path)
    out = tmp_path / "out"
    crash = Spy(monkeypatch, crash_on="search")
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.main(args)
    done_first = {p.name for p in (out / "points").glob("*.json")}
    assert done_first == {
        "dense@1_s0.json",
        *(f"{m}@{b}_s0.json"
          for m in ("dynamic", "static_gates", "early_exit", "static_early_exit", "static_gates_ft",
                    "static_cascade", "static_cascade_ft", "ln_structured", "random")
          for b in (0.3, 0.5)),
    }  # fmt: skip
    assert len(_rows(out)) == 19  # the CSV is rewritten after every point
    before = {name: (out / "points" / name).read_bytes() for name in done_first}
    assert crash.calls[-1] == ("search", 0.3)

    monkeypatch.undo()
    spy = Spy(monkeypatch)
    assert sweep_mod.main(args) == 0
    assert sorted(spy.calls) == sorted(
        (m, b) for m in ("search", "iterative", "magnitude") for b in (0.3, 0.5)
    )
    for name, content in before.items():  # finished points untouched
        assert (out / "points" / name).read_bytes() == content

    rows = _rows(out)
    assert (out / "sweep.csv").read_text().startswith(REQUIRED)
    assert list(rows[0]) == COLUMNS
    assert {(r["method"], float(r["budget"])) for r in rows} == {("dense", 1.0)} | {
        (m, b) for m in METHODS if m != "dense" for b in (0.3, 0.5)
    }
    by = {(r["method"], float(r["budget"])): r for r in rows}
    assert float(by["dense", 1.0]["flops_ratio"]) == pytest.approx(1.0)
    for b in (0.3, 0.5):
        mag = by["magnitude", b]
        assert float(mag["flops_ratio"]) == pytest.approx(1.0)  # zeros still execute
        assert float(mag["sparsity"]) == pytest.approx(1 - b, abs=1e-3)
        assert float(mag["nonzero_flops_ratio"]) < 1.0
        assert float(by["dynamic", b]["flops_ratio_p95"]) <= b + 1e-9
        ee = json.loads((out / "points" / f"early_exit@{b}_s0.json").read_text())
        assert b - 0.1 < ee["calibration_flops_ratio"] <= b  # fitted on 24 validation examples
        assert (
            0.25
            < float(ee["flops_ratio_p5"])
            <= float(ee["flops_ratio"])
            <= float(ee["flops_ratio_p95"])
            < 1.1
        )
        assert (
            sum(ee["exit_share"]) == pytest.approx(1.0) and ee["finetune_steps"] == 4
        )  # 2 steps x 2 budgets
        # width from the static control (2 x the budget, at most its top trained budget), depth from exits
        see = json.loads((out / "points" / f"static_early_exit@{b}_s0.json").read_text())
        width = min(2 * b, 0.8)
        assert see["static_width"] == pytest.approx(width) and see["finetune_steps"] == 4
        assert (tmp_path / "work" / "models" / f"static_gates@{width:g}_s0" / "config.json").is_file()
        assert see["calibration_flops_ratio"] <= b and float(see["flops_ratio_p95"]) <= width + 0.05
        assert len(see["exit_share"]) == sum(1 for part in see["structure"].split() if part != "-")
        # the equal-steps control: the same static_gates export, fine-tuned the exits' extra steps
        ft = json.loads((out / "points" / f"static_gates_ft@{b}_s0.json").read_text())
        assert ft["finetune_steps"] == see["finetune_steps"] == 4
        assert ft["structure"] == by["static_gates", b]["structure"]
        assert f"static_gates@{b:g}_s0" in ft["notes"]
        static = json.loads((out / "points" / f"static_gates@{b}_s0.json").read_text())
        assert ft["loss"] != pytest.approx(static["loss"], rel=1e-6)  # the fine-tune moved the weights
        # the static control at a mean budget: run low, the least confident re-run high, governed
        sc = json.loads((out / "points" / f"static_cascade@{b}_s0.json").read_text())
        assert sc["cascade"]["low"] < b < sc["cascade"]["high"] and sc["finetune_steps"] == 0
        assert sc["calibration_flops_ratio"] <= b + 1e-9 and sc["calibration_examples"] == 24
        assert 0.0 <= sc["rerun_share"] <= 1.0 and "governed while evaluating" in sc["notes"]
        # an input costs low, or low + high when re-run: p5 at the first pass, the mean between
        assert float(sc["flops_ratio_p5"]) <= sc["cascade"]["low"] + 0.05
        assert (
            float(sc["flops_ratio_p5"])
            <= float(sc["flops_ratio"])
            <= sc["cascade"]["low"] + sc["cascade"]["high"]
        )
        # at equal steps: the same pair as two exports, each fine-tuned half of static_gates_ft's steps
        scf = json.loads((out / "points" / f"static_cascade_ft@{b}_s0.json").read_text())
        assert (
            scf["cascade"]["low"] == sc["cascade"]["low"] and scf["cascade"]["high"] == sc["cascade"]["high"]
        )
        assert (
            scf["finetune_steps"] == ft["finetune_steps"] == 4 and "governed while evaluating" in scf["notes"]
        )
        for part in ("low", "high"):
            assert (
                tmp_path / "work" / "models" / f"static_cascade_ft@{sc['cascade'][part]:g}_s0" / "config.json"
            ).is_file()
        assert scf["calibration_flops_ratio"] <= b + 1e-9 and 0.0 <= scf["rerun_share"] <= 1.0
        for m in ("ln_structured", "iterative", "search", "random", "static_gates", "static_gates_ft"):
            r = by[m, b]
            assert float(r["flops_ratio"]) <= b + 0.03, (m, b, r["flops_ratio"])
            assert int(r["params"]) < int(by["dense", 1.0]["params"])
            assert (tmp_path / "work" / "models" / f"{m}@{b:g}_s0" / "config.json").is_file()
        for r in (by[m, b] for m in METHODS if m != "dense"):
            for key in (
                "accuracy",
                "latency_ms_bs1",
                "latency_ms_bs16",
                "speedup_bs1",
                "speedup_bs16",
                "disk_bytes",
            ):
                assert r[key] != "", (r["method"], key)
    assert (out / "pareto.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "## Goals" in summary and "best static" in summary and "| magnitude |" in summary
    # one seed per contender: numbers and intervals, but no verdict on any comparison (executed FLOPs
    # vs target is a measurement on the evaluation split: its MET / MISSED stands with one seed)
    goals = [line for line in summary.split("## Results")[0].splitlines() if line.startswith("- ")]
    comparisons = [line for line in goals if " vs " in line and not line.startswith("- executed mean FLOPs")]
    assert "no verdict: dynamic has 1 seed(s) < 3" in summary and len(comparisons) >= 3
    assert not any("MET" in line for line in comparisons), comparisons
    point = json.loads((out / "points" / "dynamic@0.3_s0.json").read_text())
    assert len(point["correct"]) == 24 and set(point["correct"]) <= {"0", "1"}
    assert sum(c == "1" for c in point["correct"]) / 24 == pytest.approx(point["accuracy"])

    monkeypatch.undo()
    again = Spy(monkeypatch)
    assert sweep_mod.main(args) == 0
    assert again.calls == []  # everything finished: nothing recomputed


def test_a_crash_after_fine_tuning_keeps_the_fine_tuned_model(tiny_run, tmp_path, monkeypatch):
    args = _args(tiny_run, tmp_path, "--methods=[ln_structured]", "--budgets=[0.5]")
    calls = []
    real_finetune = sweep_methods.finetune

    def counting_finetune(*a, **k):
        calls.append(1)
        return real_finetune(*a, **k)

    monkeypatch.setattr(sweep_methods, "finetune", counting_finetune)
    real_measure = sweep_methods.measure_point
    monkeypatch.setattr(sweep_methods, "measure_point", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        sweep_mod.main(args)
    assert calls == [1]
    monkeypatch.setattr(sweep_methods, "measure_point", real_measure)
    assert sweep_mod.main(args) == 0
    assert calls == [1]  # the cached fine-tuned export was reused
    assert len(_rows(tmp_path / "out")) == 1


def test_changed_settings_do_not_mix_with_finished_points(tiny_run, tmp_path, capsys):
    args = _args(tiny_run, tmp_path, "--methods=[dense]")
    assert sweep_mod.main(args) == 0
    assert sweep_mod.main([*args, "--finetune.steps=5"]) == 2
    assert "different settings (finetune)" in capsys.readouterr().err
    assert sweep_mod.main([*args, "--finetune.steps=5", "--restart"]) == 0


def test_a_setting_added_since_resumes_at_its_default(tiny_run, tmp_path, capsys):
    """Points computed before a setting existed resume when it has its default value, and do not
    when it has another (a field added to the early_exit section once refused every running sweep)."""
    import json

    args = _args(tiny_run, tmp_path, "--methods=[dense]")
    assert sweep_mod.main(args) == 0
    meta = tmp_path / "out" / "sweep_meta.json"
    saved = json.loads(meta.read_text())
    del saved["fingerprint"]["early_exit"]["width_factor"]  # as if written before the setting existed
    meta.write_text(json.dumps(saved))
    assert sweep_mod.main(args) == 0
    assert sweep_mod.main([*args, "--early_exit.width_factor=3"]) == 2
    assert "different settings (early_exit)" in capsys.readouterr().err
    del saved["fingerprint"]["cascade"]  # a whole section added since
    meta.write_text(json.dumps(saved))
    assert sweep_mod.main(args) == 0
    assert sweep_mod.main([*args, "--cascade.governor=false"]) == 2
    assert "different settings (cascade)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods=[dense,pruned_by_magic]"], "unknown method(s) ['pruned_by_magic']"),
        (["--budgets=[]"], "budget list is empty"),
        (["--budgets=[0.5,1.5]"], "(0, 1]"),
        (["--budgets=[0.0]"], "(0, 1]"),
        (["--budgets=[0.1]"], "outside the range the gated models were trained for"),
        (["--finetune.stepz=3"], "finetune"),
        (["--timing.repeats=0"], "timing.repeats"),
        (["--early_exit.width_factor=0.5"], "early_exit.width_factor must be >= 1"),
        (["--cascade.calibration_examples=0"], "cascade.calibration_examples must be > 0"),
        (["--methods=[static_cascade]", "--budgets=[0.2]"], "static_cascade cannot run budget 0.2"),
    ],
)
def test_bad_configs_fail_before_any_work(tiny_run, tmp_path, capsys, extra, message):
    assert sweep_mod.main(_args(tiny_run, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_inputs_fail_before_any_work(tiny_run, tmp_path, capsys):
    assert sweep_mod.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert sweep_mod.main(_args(tmp_path / "no_run", tmp_path)) == 2
    assert "not a `dynprune train` output directory" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    os.symlink(tiny_run / "dense", partial / "dense")
    assert sweep_mod.main(_args(partial, tmp_path, "--methods=[dense,static_gates]")) == 2
    assert "no finished 'static' stage" in capsys.readouterr().err


def test_quick_applies_the_quick_section(tmp_path):
    cfg, _ = sweep_mod.parse_args(["--quick", "--quick.budgets=[0.4]", "--quick.finetune_steps=7"])
    assert cfg.budgets == [0.4] and cfg.finetune.steps == 7
    assert cfg.evaluation.max_examples == cfg.quick.eval_max_examples
    assert (
        cfg.contender_seeds == [0]
        and cfg.indicative == "quick grid: indicative only (one seed, reduced steps)"
    )


def test_keys_given_on_the_command_line_win_over_the_quick_section():
    argv = ["--quick", "--quick.methods=[dense,random]", "--methods=[dense,static_gates]"]
    cfg, _ = sweep_mod.parse_args([*argv, "--budgets=[0.3]", "--finetune.steps=5", "--seeds=[2,3]"])
    assert cfg.methods == ["dense", "static_gates"] and cfg.budgets == [0.3]
    assert cfg.finetune.steps == 5 and cfg.seeds == [2, 3] and cfg.seed == 2
    assert cfg.evaluation.max_examples == cfg.quick.eval_max_examples  # the rest of quick still applies
    cfg, _ = sweep_mod.parse_args(argv[:2])
    assert cfg.methods == ["dense", "random"] and cfg.budgets == cfg.quick.budgets


@pytest.mark.parametrize(("seeds", "verdicts"), [("[0]", False), ("[0,1]", False), ("[0,1,2]", True)])
def test_a_quick_grid_gives_verdicts_once_it_has_the_seeds_for_them(seeds, verdicts):
    cfg, _ = sweep_mod.parse_args(["--quick", f"--quick.seeds={seeds}"])
    assert (cfg.indicative is None) == verdicts
    assert any("verdicts are about this reduced recipe" in n for n in cfg.summary_notes) == verdicts


def _seed_copy(run, dest):
    """A second 'training run' for seed 1 (same files; the sweep only reads them)."""
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


def test_contenders_run_over_seeds_and_the_summary_reports_spread(tiny_run, tmp_path, capsys):
    seed_dirs = tmp_path / "seedruns"
    _seed_copy(tiny_run, seed_dirs / "run_seed1")
    _seed_copy(tiny_run, seed_dirs / "run_seed2")
    args = _args(
        tiny_run, tmp_path, "--methods=[dense,dynamic,early_exit]", "--budgets=[0.5]",
        "--seeds=[0,1,2]", f"--seed_training_dir={seed_dirs}/run_seed{{seed}}", "--stats.resamples=500",
    )  # fmt: skip
    assert sweep_mod.main(args) == 0
    out = tmp_path / "out"
    names = {p.name for p in (out / "points").glob("*.json")}
    assert names == {
        "dense@1_s0.json", *(f"{m}@0.5_s{s}.json" for m in ("dynamic", "early_exit") for s in (0, 1, 2)),
    }  # fmt: skip
    rows = _rows(out)
    assert sorted(int(r["seed"]) for r in rows if r["method"] == "early_exit") == [0, 1, 2]
    summary = (out / "summary.md").read_text()
    assert "| early_exit | 0.5 | 3 |" in summary and " ± " in summary
    assert "dynamic within 0.5 pt of dense at 50% FLOPs" in summary
    # three seeds: this goal gets a verdict; the summary and stdout agree
    goal = next(line for line in summary.splitlines() if "within 0.5 pt of dense" in line)
    assert any(w in goal for w in ("MET", "MISSED", "NOT SHOWN")) and "CI [" in goal
    assert goal[2:] in capsys.readouterr().out
    assert (out / "pareto.png").stat().st_size > 10_000


def test_a_missing_seed_run_fails_before_any_work_and_says_how_to_make_it(tiny_run, tmp_path, capsys):
    args = _args(tiny_run, tmp_path, "--methods=[dense,dynamic]", "--seeds=[0,5]")
    assert sweep_mod.main(args) == 2
    err = capsys.readouterr().err
    assert f"{tiny_run}_seed5" in err and "--seed=S --stages=[gated,static]" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_sweep_process_resumes(tiny_run, tmp_path):
    """kill -9 a real `dynprune sweep` process mid-grid; the re-run keeps every finished point."""
    cmd = [sys.executable, "-m", "dynprune.eval.sweep", *_args(tiny_run, tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    points = tmp_path / "out" / "points"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(points.glob("*.json"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.name: p.read_bytes() for p in points.glob("*.json")}
    assert 3 <= len(first) < 17
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    final = {p.name: p.read_bytes() for p in points.glob("*.json")}
    assert len(final) == 17
    assert all(final[name] == content for name, content in first.items())
    assert len(_rows(tmp_path / "out")) == 17


@pytest.mark.slow
def test_sweep_on_a_real_training_pipeline_run(tmp_path):
    from tests.eval.tiny_run import make_training_run

    run = make_training_run(tmp_path / "train")
    assert sweep_mod.main(_args(run, tmp_path, "--methods=[dense,dynamic,static_gates,ln_structured]")) == 0
    assert (
        json.loads((tmp_path / "out" / "points" / "dynamic@0.3_s0.json").read_text())["finetune_steps"] == 3
    )


def test_shipped_sweep_config_parses_in_both_modes():
    cfg, _ = sweep_mod.parse_args(["--config", "configs/sweep_minilm_rt.yaml"])
    assert set(cfg.methods) == set(METHODS) and 0.25 in cfg.budgets
    assert len(cfg.contender_seeds) >= 3 and cfg.indicative is None
    quick, _ = sweep_mod.parse_args(["--config", "configs/sweep_minilm_rt.yaml", "--quick"])
    assert quick.output_dir != cfg.output_dir and 0.25 in quick.budgets
    # the quick grid: the static control and early exit, the fine-tuning steps derived like the full
    # sweep's (the dynamic model's), one seed and no verdicts
    assert {"static_gates", "early_exit", "dynamic"} <= set(quick.methods)
    assert quick.finetune.steps is None and quick.finetune.match == cfg.finetune.match
    assert quick.contender_seeds == [0] and "indicative only" in quick.indicative


def test_thresholds_fitted_on_the_evaluation_inputs_land_the_mean_there(tiny_run, tmp_path):
    args = _args(tiny_run, tmp_path, "--methods=[dense,early_exit]", "--budgets=[0.5]")
    assert sweep_mod.main([*args, "--early_exit.calibration_split=evaluation"]) == 0
    ee = json.loads((tmp_path / "out" / "points" / "early_exit@0.5_s0.json").read_text())
    # the same inputs in the same batches: the executed mean FLOPs is the calibrated one
    assert ee["calibration_examples"] == 24
    assert float(ee["flops_ratio"]) == pytest.approx(ee["calibration_flops_ratio"], rel=1e-9)
    assert "evaluation inputs' mean FLOPs" in ee["notes"]


def test_a_cascade_fitted_on_the_evaluation_inputs_reproduces_its_fit_there(tiny_run, tmp_path):
    """Ungoverned, fitted on the very batches it is evaluated on: the executed mean FLOPs and accuracy
    are the fit's (the point runs the fitted policy, both passes counted), and the re-run share is the
    fit's too."""
    args = _args(
        tiny_run, tmp_path, "--methods=[static_cascade]", "--budgets=[0.5]", "--evaluation.split=validation"
    )
    assert sweep_mod.main([*args, "--cascade.governor=false"]) == 0
    sc = json.loads((tmp_path / "out" / "points" / "static_cascade@0.5_s0.json").read_text())
    assert sc["calibration_examples"] == 24 and "governed" not in sc["notes"]
    assert float(sc["flops_ratio"]) == pytest.approx(sc["calibration_flops_ratio"], rel=1e-9)
    fitted = sc["notes"].split("fitted on 24 validation examples: accuracy ")[1]
    assert float(sc["accuracy"]) == pytest.approx(float(fitted.split(",")[0]), abs=1e-4)
    assert f"{sc['rerun_share']:.1%} re-run)" in sc["notes"]


def test_a_governed_early_exit_reports_its_correction_and_where_inputs_left(tiny_run, tmp_path, capsys):
    args = _args(
        tiny_run, tmp_path, "--methods=[dense,early_exit]", "--budgets=[0.5]", "--evaluation.batch_size=8"
    )
    assert sweep_mod.main([*args, "--early_exit.governor=true"]) == 0
    ee = json.loads((tmp_path / "out" / "points" / "early_exit@0.5_s0.json").read_text())
    assert "governed while evaluating" in ee["notes"]
    assert {"threshold_final", "governor_bias"} <= set(ee)
    assert sum(ee["exit_share"]) == pytest.approx(1.0, abs=1e-3)
    # a governed point is another setting: the ungoverned sweep does not reuse it
    assert sweep_mod.main(args) == 2
    assert "different settings (early_exit)" in capsys.readouterr().err


def test_evaluation_in_another_batch_order_keeps_results_in_the_fixed_order():
    from types import SimpleNamespace

    from dynprune.eval.runners import DenseRunner
    from dynprune.eval.structure import static_flops_model
    from dynprune.eval.sweep_measure import evaluate_runner

    from tests.helpers import tiny_batch, tiny_model

    model = tiny_model("bert", layers=2, num_labels=3).eval()
    batches = []
    for s, seq in enumerate((7, 9, 12, 15)):
        b = tiny_batch(batch=5, seq=seq, seed=s)
        b["labels"] = torch.arange(5) % 3
        batches.append(b)
    ctx = SimpleNamespace(eval_batches=batches, fm=static_flops_model(model))
    runner = DenseRunner(model, ctx.fm)
    fixed = evaluate_runner(ctx, runner)
    shuffled = evaluate_runner(ctx, runner, order=[2, 0, 3, 1])
    assert shuffled["correct"] == fixed["correct"]
    for key in ("accuracy", "flops_ratio", "flops_ratio_p5", "flops_ratio_p95"):
        assert shuffled[key] == pytest.approx(fixed[key])
    with pytest.raises(ValueError, match="permutation"):
        evaluate_runner(ctx, runner, order=[0, 0, 1, 2])
