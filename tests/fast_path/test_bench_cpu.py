"""`dynprune bench cpu` smoke run on a tiny model, and the timing helpers (no timed assertions)."""

import csv

import pytest
import torch
from dynprune.eval.bench_cpu import COLUMNS
from dynprune.eval.timing import TimingStats, paired_ratio, time_interleaved

from dynprune.cli import main as cli_main
from tests.helpers import tiny_model

REQUIRED = ["model", "batch", "seq", "mask_mode", "budget", "flops_ratio", "dense_ms", "gated_ms", "speedup", "ideal_speedup", "ratio_to_ideal", "limit_ms", "router_share", "distinct_masks"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert")
    tiny_model("bert", layers=3, heads=4, hidden=64, ffn=256).save_pretrained(path)
    return path


def test_bench_cpu_smoke(tiny_dir, tmp_path, capsys):
    out = tmp_path / "bench.csv"
    argv = ["bench", "cpu", "--model", str(tiny_dir), "--out", str(out), "--batches", "1", "4",
            "--seqs", "24", "--budgets", "0.4", "0.7", "--repeats", "2", "--warmup", "1",
            "--router-scale", "2.0", "--threads", "1", "--env", "keep", "--engines", "eager"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "re-initialised" in printed
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert set(REQUIRED) <= set(rows[0]) and list(rows[0]) == COLUMNS
    assert len(rows) == 2 * 2 * 2  # batches × modes × budgets
    assert out.with_suffix(".md").read_text().count("|") > 20
    for r in rows:
        flops, budget = float(r["flops_ratio"]), float(r["budget"])
        assert 0 < flops <= budget + 1e-9
        # what the gathered path really executes (FlopCounterMode) is what its plans compute,
        # which is the FLOPs module's count of the kept units plus merged-block waste
        computed, counted = float(r["computed_flops_ratio"]), float(r["counted_flops_ratio"])
        assert counted == pytest.approx(computed, rel=0.01)
        assert computed >= flops - 1e-9
        if r["mask_mode"] == "shared" or r["batch"] == "1":
            assert r["distinct_masks"] == "1"
            assert computed == pytest.approx(flops, rel=1e-9)  # one block per kind: no waste
        # each of the three columns is rounded to 3 decimals: allow their rounding, nothing more
        assert float(r["ratio_to_ideal"]) == pytest.approx(
            float(r["speedup"]) / float(r["ideal_speedup"]), abs=2e-3
        )
        assert float(r["ideal_speedup"]) == pytest.approx(1 / flops, rel=1e-3)
        assert float(r["limit_flops_ratio"]) > 0 and float(r["limit_ms"]) > 0
    assert any(int(r["distinct_masks"]) > 1 for r in rows if r["mask_mode"] == "per_sample")


def test_bench_cpu_rejects_bad_arguments(capsys):
    assert cli_main(["bench", "cpu", "--budgets", "1.5"]) == 2
    assert "budgets" in capsys.readouterr().err


def test_time_interleaved_alternates_and_reports_spread():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    stats = time_interleaved(fns, warmup=1, repeats=4)
    assert calls[:3] == ["a", "b", "c"]  # warm-up round
    rounds = [calls[3 + 3 * i : 6 + 3 * i] for i in range(4)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every round runs each once
    assert len({tuple(r) for r in rounds}) > 1  # order rotates
    assert all(s.n == 4 and s.iqr_ms >= 0 and s.q1_ms <= s.median_ms <= s.q3_ms for s in stats.values())
    assert torch.is_inference_mode_enabled() is False


def test_paired_ratio_is_median_of_round_ratios():
    a = TimingStats("a", [2.0, 4.0, 9.0])
    b = TimingStats("b", [1.0, 1.0, 3.0])
    assert paired_ratio(a, b) == 3.0
    with pytest.raises(ValueError):
        paired_ratio(a, TimingStats("c", [1.0]))


def test_bench_cpu_with_saved_gated_model(tmp_path, capsys):
    import dynprune

    gated = dynprune.wrap(tiny_model("bert", layers=2, heads=4, hidden=64, ffn=128),
                          dynprune.GateConfig(ffn_slice_size=32))  # fmt: skip
    dynprune.save_gated_model(gated, tmp_path / "ckpt")
    out = tmp_path / "b.csv"
    argv = ["bench", "cpu", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--batches", "2",
            "--seqs", "12", "--budgets", "0.6", "--modes", "shared", "--repeats", "1", "--warmup", "0",
            "--threads", "1", "--env", "keep", "--no-limit", "--engines", "eager"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "trained gates" in capsys.readouterr().out
    with open(out) as f:
        (row,) = list(csv.DictReader(f))
    assert row["limit_ms"] == "" and 0 < float(row["flops_ratio"]) <= 0.6 + 1e-9
