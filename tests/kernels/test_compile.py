"""Every kernel compiles for sm_80 and sm_90 in every dtype, without a GPU (ptxas runs on the CPU).

The interpreter accepts programs that the compiler rejects, so CI compiles too.
Runs in a subprocess because this test session imports the kernels under
TRITON_INTERPRET=1 (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _compile_check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "dynprune.kernels.compile_check", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)


def test_every_kernel_compiles_for_sm80_and_sm90_in_every_dtype():
    done = _compile_check("--quick")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "42/42 kernel configurations compiled" in done.stdout, done.stdout[-2000:]


@pytest.mark.slow
def test_all_default_tile_configurations_compile():
    """Every tile configuration the launchers pick for MiniLM / BERT-base / Llama-7B shapes."""
    done = _compile_check()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_compile_check_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "dynprune.kernels.compile_check", "--quick"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "TRITON_INTERPRET is set" in done.stderr
