"""`dynprune calibrate` + `dynprune eval --budget mean:...`: calibration saved with the gates,
clear errors before any work, and results never overwritten silently."""

import json
import shutil

import pytest

from dynprune.cli import main as cli_main

FAST = ["--no-latency", "--threads", "1"]


@pytest.fixture()
def ckpt(tiny_run, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(tiny_run / "gated", out)  # with its config.yaml (the data split)
    return out


def test_missing_calibration_fails_before_work_and_says_how(ckpt, capsys):
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "mean:0.4", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and f"dynprune calibrate --checkpoint {ckpt} --target 0.4" in err
    assert not (ckpt / "eval").exists()


def test_calibrate_then_eval_mean_budget_and_no_silent_overwrite(ckpt, capsys):
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--target", "0.4", "--threads", "1"]) == 0
    saved = json.loads((ckpt / "gates" / "calibration.json").read_text())
    assert saved["entries"]["mean:0.4"]["policy"] == "cascade"  # a cap-trained checkpoint: auto -> cascade
    # calibrating the same target again needs --overwrite
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--target", "0.4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--target", "0.4", "--policy", "threshold"]) == 2
    assert "budget_mode=mean" in capsys.readouterr().err

    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "mean:0.4", "0.5", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "mean:0.4" in printed and "by length quartile" in printed
    result = ckpt / "eval" / "eval-0.5_mean0.4.json"
    rows = {r["budget_spec"]: r for r in json.loads(result.read_text())["rows"]}
    assert set(rows) == {"1", "0.5", "mean:0.4"}
    mean_row = rows["mean:0.4"]
    assert mean_row["flops_ratio_p5"] <= mean_row["flops_ratio_p50"] <= mean_row["flops_ratio_p95"]
    assert len(mean_row["compute"]["flops_by_length_quartile"]) == 4
    before = result.read_bytes()
    # the same budgets again: refused, the first result kept
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "0.5", "mean:0.4", *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err and result.read_bytes() == before
    # other budgets: a file of their own, next to the first
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "0.5", *FAST]) == 0
    assert (ckpt / "eval" / "eval-0.5.json").is_file() and result.read_bytes() == before


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("mean:0", "MeanBudget.target"),
        ("mean:0.5,cap:0.2", "must be >= the mean target"),
        ("avg:1", "neither"),
    ],
)
def test_bad_mean_budgets_fail_fast(ckpt, capsys, budget, message):
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", budget, *FAST]) == 2
    assert message in capsys.readouterr().err


def test_a_governed_evaluation_writes_a_file_of_its_own_with_the_governors_account(ckpt, capsys):
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--target", "0.4", "--threads", "1"]) == 0
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "mean:0.4", "--govern", *FAST]) == 0
    result = ckpt / "eval" / "eval-mean0.4-governed.json"
    rows = {r["budget_spec"]: r for r in json.loads(result.read_text())["rows"]}
    gov = rows["mean:0.4"]["governor"]
    assert set(gov) == {"calibrated_knob", "final_knob", "bias"}
    assert gov["final_knob"] != gov["calibrated_knob"] or gov["bias"] == 0.0
    # the ungoverned evaluation of the same budget is another result, not an overwrite
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "mean:0.4", *FAST]) == 0
    assert (ckpt / "eval" / "eval-mean0.4.json").is_file() and result.is_file()


def test_governing_a_calibration_without_a_curve_is_refused_before_work(ckpt, capsys):
    assert cli_main(["calibrate", "--checkpoint", str(ckpt), "--target", "0.4", "--threads", "1"]) == 0
    path = ckpt / "gates" / "calibration.json"
    saved = json.loads(path.read_text())
    del saved["entries"]["mean:0.4"]["fitted"]["curve"]  # as written before governed budgets existed
    path.write_text(json.dumps(saved))
    rc = cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "mean:0.4", "--govern", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "no curve" in err
    fix = f"dynprune calibrate --checkpoint {ckpt} --target 0.4 --overwrite"
    assert fix in err and not (ckpt / "eval").exists()
    assert cli_main([*fix.split()[1:], "--threads", "1"]) == 0  # the advice works
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--budget", "mean:0.4", "--govern", *FAST]) == 0
