"""`dynprune eval`: the table and JSON on a tiny checkpoint, and clear errors for bad input."""

import json
import shutil

import pytest
from dynprune.eval.cli import main as eval_main

from dynprune.cli import main as cli_main
from tests.eval.tiny_run import tiny_model_dir, write_reviews

FAST = ["--repeats", "1", "--bs1-inputs", "1", "--bs16-batches", "1", "--threads", "1"]


def test_eval_table_json_csv_and_frozen_export(tiny_run, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = cli_main(
        ["eval", "--checkpoint", str(tiny_run / "gated"), "--budget", "0.5", "0.3", "--out", str(out),
         "--export-frozen", str(tmp_path / "frozen"), *FAST]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "budget" in printed and "bs16 ms (dense)" in printed and "frozen to its most common mask" in printed
    )
    res = json.loads((out / "eval-0.5_0.3.json").read_text())
    rows = {r["budget"]: r for r in res["rows"]}
    assert set(rows) == {1.0, 0.5, 0.3}
    assert rows[1.0]["flops_ratio_mean"] == pytest.approx(1.0)
    for b in (0.5, 0.3):
        r = rows[b]
        assert r["flops_ratio_p95"] <= b + 1e-9  # executed FLOPs never exceed the budget
        assert r["flops_ratio_p5"] <= r["flops_ratio_mean"] <= r["flops_ratio_p95"]
        assert 0 <= r["accuracy"] <= 1 and r["speedup_bs1"] > 0 and r["ideal_speedup_bs16"] >= 1 / b - 0.5
        assert (
            r["gates"]["distinct_masks"] >= 1 and len(r["keep_rate_per_layer"]["head"]) == 4
        )  # tests/eval/tiny_run.py: 4 layers
        assert (tmp_path / "frozen" / f"budget_{b:g}" / "config.json").is_file()
        # the frozen model as a plain ONNX file: the same predictions as the exported HF model
        frozen = r["frozen_export"]
        assert (tmp_path / "frozen" / f"budget_{b:g}" / "model.onnx").is_file() and frozen["onnx"]
        assert frozen["onnx_agreement"] == 1.0 and frozen["onnx_max_abs_logit_diff"] < 1e-4
    assert rows[0.3]["flops_ratio_mean"] < rows[0.5]["flops_ratio_mean"]
    header = (out / "eval-0.5_0.3.csv").read_text().splitlines()[0]
    assert "accuracy" in header and "speedup_bs1" in header


def test_eval_on_a_local_file_and_the_training_run_dir(tiny_run, tmp_path):
    data = write_reviews(tmp_path / "d.csv", 6)
    rc = eval_main(["--checkpoint", str(tiny_run), "--data", str(data), "--budget", "0.5", "--no-latency",
                    "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "o" / "eval-0.5.json").read_text())
    assert res["n_examples"] == 6 and res["checkpoint"].endswith("gated")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget"], "expected at least one argument"),
        (["--budget", "0"], "(0, 1]"),
        (["--budget", "1.5"], "(0, 1]"),
        (["--budget", "0.1"], "outside the range this checkpoint was trained for"),
    ],
)
def test_bad_budgets_fail_fast(tiny_run, capsys, args, message):
    with pytest.raises(SystemExit) if message.startswith("expected") else _noop():
        rc = eval_main(["--checkpoint", str(tiny_run / "gated"), "--no-latency", *args])
        assert rc == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoints_and_data_fail_fast(tiny_run, tmp_path, capsys):
    ck = str(tiny_run / "gated")
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "does not exist"),
        (["--checkpoint", str(tiny_run / "dense")], "plain Hugging Face model"),
        (["--checkpoint", str(tmp_path)], "not a gated checkpoint"),
        (["--checkpoint", ck, "--data", str(tmp_path / "missing.csv")], "does not exist"),
    ]
    bad_cols = tmp_path / "cols.csv"
    bad_cols.write_text("review,y\nx,pos\n")
    cases.append((["--checkpoint", ck, "--data", str(bad_cols)], "has no column(s) ['text', 'label']"))
    unseen = tmp_path / "unseen.csv"
    unseen.write_text("text,label\nfilm,neutral\nplot,pos\n")
    cases.append((["--checkpoint", ck, "--data", str(unseen)], "never seen in training"))
    # gates of another model: the gated checkpoint's gates next to a different-size base model
    other = tmp_path / "other"
    shutil.copytree(tiny_run / "gated", other)
    shutil.rmtree(other / "base")
    tiny_model_dir(other / "base", ffn=96)
    cases.append((["--checkpoint", str(other)], "saved for a different model"))
    for args, message in cases:
        rc = eval_main([*args, "--no-latency", "--budget", "0.5"])
        err = capsys.readouterr().err
        assert rc == 2, args
        assert message in err, (args, err)


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
