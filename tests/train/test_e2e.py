"""`dynprune train` end to end on a tiny model: every stage, the output layout the evaluation
engineer consumes, a real learning signal, and bad input that fails early without touching disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from dynprune.train import DataConfig, eval_dataloader, evaluate, load_task_data
from dynprune.train.cli import main, parse_config

import dynprune
from tests.train.test_resume import tiny_run_args
from tests.train.tiny import sentiment_rows, tiny_model_dir, write_csv


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model, data = tiny_model_dir(root / "model"), write_csv(root / "data.csv", sentiment_rows(400))
    out = root / "run"
    args = tiny_run_args(
        model,
        data,
        out,
        "--stages=[dense,gated,static]",
        "--optim.dense_epochs=3",
        "--optim.gated_epochs=4",
        "--evaluation.budgets=[0.3,0.5,0.75]",
        "--gate.budget_min=0.3",
        "--checkpoint.every_steps=1000",
    )
    assert main(args) == 0
    return out, model, data, args


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_output_layout(finished_run):
    out, *_ = finished_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "config.yaml"):
        assert (out / "dense" / name).is_file(), name
    for stage in ("gated", "static"):
        for name in (
            "base/config.json",
            "base/model.safetensors",
            "gates/gates.json",
            "config.yaml",
            "metrics.json",
        ):
            assert (out / stage / name).is_file(), f"{stage}/{name}"
    for name in ("results.csv", "adaptivity.csv", "summary.md", "summary.json", "keep_rates.png"):
        assert (out / "report" / name).is_file(), name
    assert (out / "logs" / "metrics.jsonl").is_file()
    saved = parse_config([f"--config={out / 'gated' / 'config.yaml'}"])
    assert saved.output_dir == str(out) and saved.gate.ffn_slice_size == 32


def test_models_learn_and_reload(finished_run):
    out, _model_dir, data_path, _ = finished_run
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["dense_accuracy"] >= 0.9  # the synthetic task is learnable
    rows = {(r["model"], r["budget"]): r for r in summary["rows"]}
    for b in (0.3, 0.5, 0.75):
        for stage in ("gated", "static"):
            r = rows[(stage, b)]
            # within one unit of the budget: a unit of this tiny model is up to ~7 % of dense FLOPs
            assert r["flops_ratio_max"] <= b + 1e-9 and b * abs(r["flops_rel_error"]) < 0.07
    assert rows[("gated", 0.75)]["accuracy"] >= 0.8
    # one run is one seed: accuracy comparisons are numbers, the only verdict is on executed FLOPs
    assert list(summary["goals"]) == ["executed FLOPs within +-2% of target"]
    diffs = {d["pair"]: d["diff_pt"] for d in summary["accuracy_differences"]}
    assert diffs["gated - static @0.5"] == pytest.approx(
        100 * (rows[("gated", 0.5)]["accuracy"] - rows[("static", 0.5)]["accuracy"])
    )
    assert len(diffs) == 6  # vs dense and vs static at each of the 3 budgets
    md = (out / "report" / "summary.md").read_text()
    assert "indicative only, no verdict" in md and "gated - dense @0.3" in md
    from transformers import AutoModelForSequenceClassification

    dense = AutoModelForSequenceClassification.from_pretrained(out / "dense")
    assert dense.config.id2label == {0: "neg", 1: "pos"}
    gated, tok = dynprune.load_gated_model(out / "gated")
    data = load_task_data(DataConfig(path=str(data_path)))
    again = evaluate(gated, eval_dataloader(data, tok, "test", batch_size=64), budget=0.5)
    metrics = json.loads((out / "gated" / "metrics.json").read_text())
    assert again["accuracy"] == pytest.approx(metrics["test"]["0.5"]["accuracy"])
    assert metrics["router"] == "dynamic" and metrics["train"]["steps"] > 0
    static, _ = dynprune.load_gated_model(out / "static")
    assert static.gate_config.router == "static"


def test_existing_run_is_never_overwritten(finished_run, capsys):
    out, _, _, args = finished_run
    before = _tree_digest(out)
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resuming with a different gate setting is refused and names the key
    assert main([*args, "--resume", "--gate.router_layer=1"]) == 2
    assert "gate.router_layer" in capsys.readouterr().err
    assert _tree_digest(out) == before
    # resuming a finished run with the same settings redoes only the report
    assert main([*args, "--resume"]) == 0
    assert (out / "gated" / "base" / "model.safetensors").read_bytes()


def test_bad_input_fails_before_any_work(finished_run, tmp_path, capsys):
    _, model, data, _ = finished_run
    one_class = write_csv(tmp_path / "one.csv", [(t, "pos") for t, _ in sentiment_rows(50)])
    out = tmp_path / "out"
    assert main(tiny_run_args(model, one_class, out)) == 2
    assert "only one class" in capsys.readouterr().err
    assert not out.exists()
    missing_col = tiny_run_args(model, data, out, "--data.label_column=stars")
    assert main(missing_col) == 2
    assert "stars" in capsys.readouterr().err and not out.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(tiny_run_args(model, data, blocker / "sub")) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(tiny_run_args(model, data, Path("/proc/dynprune-not-writable"))) == 2
    assert "not writable" in capsys.readouterr().err
    assert main(tiny_run_args(model, data, out, "--gate.budget_min=0.01", "--evaluation.budgets=[0.5]")) == 2
    assert "budget_min" in capsys.readouterr().err and not out.exists()
    assert main(tiny_run_args(model, data, out, "--gate.ffn_slice_size=48")) == 2
    assert "ffn_slice_size" in capsys.readouterr().err and not out.exists()
