"""Two processes on CPU (torchrun + gloo, as PLATFORM.md says works here): both ranks end
with identical weights and multipliers, and they trained on different data shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_two_ranks_end_with_identical_weights(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        torchrun = shutil.which("torchrun") or pytest.fail("torchrun (part of torch) not found")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests/train/ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [i["world"] for i in infos] == [2, 2]
    assert infos[0]["steps"] == infos[1]["steps"] == 6  # 96 examples / (8 x 2 ranks) x 2 epochs / 2 accum
    assert not set(infos[0]["seen"][:48]) & set(infos[1]["seen"][:48])  # first epoch: disjoint shards
    assert infos[0]["lambdas"] == infos[1]["lambdas"]
    assert infos[0]["ranks_identical"] is True
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
