"""`dynprune bench kernels`: needs a GPU; --smoke exercises the harness and CSV on the CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from dynprune.kernels.bench import COLUMNS, main, mixed_counts


def test_mixed_counts_are_per_sample_and_in_range():
    counts = mixed_counts(6, 12, 0.5)
    assert counts == [6, 4, 8, 6, 4, 8]
    assert mixed_counts(3, 4, 0.25) == [1, 1, 2]  # at least one unit each
    assert all(1 <= c <= 12 for c in mixed_counts(9, 12, 0.75))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_gpu_says_it_needs_one(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x.csv")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.real
def test_smoke_mode_writes_the_csv(tmp_path):
    out = tmp_path / "smoke.csv"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "dynprune.cli",
        "bench",
        "kernels",
        "--smoke",
        "--dtype",
        "fp32",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == COLUMNS
    assert {r["kernel"] for r in rows} == {"ffn", "attention", "e2e"}
    for r in rows:
        assert float(r["ideal_speedup"]) > 1.0
        assert float(r["ratio_to_ideal"]) == pytest.approx(
            float(r["speedup"]) / float(r["ideal_speedup"]), rel=1e-2, abs=2e-3
        )
        assert float(r["max_err"]) < 1e-4, r  # fp32: gated kernels equal the masked dense computation
