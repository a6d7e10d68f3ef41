"""Crash safety: kill -9 a run mid-training, resume it, get the same final model and metrics as an
uninterrupted run; half-written checkpoints are never loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dynprune.train import checkpoint as ckpt
from safetensors.torch import load_file

from tests.train.tiny import sentiment_rows, tiny_model_dir, write_csv

ROOT = Path(__file__).resolve().parents[2]


def tiny_run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"--model.path={model}",
        f"--data.path={data}",
        f"--output_dir={out}",
        "--stages=[dense,gated]",
        "--optim.batch_size=16",
        "--optim.dense_epochs=1",
        "--optim.gated_epochs=8",
        "--optim.dense_lr=1e-3",
        "--optim.gated_lr=1e-3",
        "--gate.ffn_slice_size=32",
        "--gate.router_hidden=16",
        "--gate.importance_batches=2",
        "--evaluation.budgets=[0.5]",
        "--checkpoint.every_steps=5",
        "--checkpoint.keep_last=2",
        "--logging.report_to=none",
        "--logging.progress=false",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}


def _train(args: list[str], **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dynprune.train", *args]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
    )


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return tiny_model_dir(root / "model"), write_csv(root / "data.csv", sentiment_rows(400))


def _final(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    metrics = json.loads((out / "gated" / "metrics.json").read_text())
    weights = load_file(str(out / "gated" / "base" / "model.safetensors"))
    weights.update(load_file(str(out / "gated" / "gates" / "gates.safetensors")))
    return metrics, weights


def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_assets, tmp_path):
    model, data = tiny_assets
    full = tmp_path / "full"
    proc = _train(tiny_run_args(model, data, full))
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]

    crashed = tmp_path / "crashed"
    proc = _train(tiny_run_args(model, data, crashed))
    root = crashed / "checkpoints" / "gated"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [s for s, p in ckpt.checkpoint_dirs(root) if ckpt.is_complete(p)]
        if done and max(done) >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (crashed / "gated" / "metrics.json").exists()
    newest = max(s for s, p in ckpt.checkpoint_dirs(root) if ckpt.is_complete(p))
    assert newest < json.loads((full / "gated" / "metrics.json").read_text())["train"]["steps"]
    # what a crash in the middle of writing would leave: a temporary dir, and a step dir without
    # its manifest (e.g. copied by hand): neither may be loaded
    (root / ".tmp-step-99999998").mkdir()
    junk = root / "step-99999999"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"garbage")
    (junk / "state.json").write_text("{")

    proc = _train([*tiny_run_args(model, data, crashed), "--resume"])
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert not (root / ".tmp-step-99999998").exists()

    (m_full, w_full), (m_res, w_res) = _final(full), _final(crashed)
    assert m_res["train"]["steps"] == m_full["train"]["steps"]
    assert m_res["multipliers"] == pytest.approx(m_full["multipliers"], rel=1e-6, abs=1e-9)
    for key in ("accuracy", "loss", "flops_ratio_mean"):
        assert m_res["test"]["0.5"][key] == pytest.approx(m_full["test"]["0.5"][key], rel=1e-6, abs=1e-7), key
    assert m_res["train"]["last_logs"]["loss"] == pytest.approx(
        m_full["train"]["last_logs"]["loss"], rel=1e-5
    )
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7, msg=k)


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    root = tmp_path / "ck"

    def write(step: int) -> Path:
        return ckpt.save_checkpoint(
            root, step, lambda d: (d / "state.json").write_text(f'{{"step": {step}}}'), keep_last=2
        )

    for step in (5, 10, 15):
        write(step)
    assert [s for s, _ in ckpt.checkpoint_dirs(root)] == [10, 15]  # keep last 2
    assert ckpt.latest_checkpoint(root) == root / "step-00000015"
    # truncated file in the newest checkpoint -> falls back to the previous one
    (root / "step-00000015" / "state.json").write_text("{")
    assert ckpt.latest_checkpoint(root) == root / "step-00000010"
    # a directory without the manifest (written last) is incomplete
    (root / "step-00000020").mkdir()
    (root / "step-00000020" / "state.json").write_text("{}")
    assert ckpt.latest_checkpoint(root) == root / "step-00000010"
    (root / "step-00000010" / ckpt.MANIFEST).unlink()
    assert ckpt.latest_checkpoint(root) is None


def test_resume_restores_rng_exactly():
    torch.manual_seed(123)
    state = ckpt.rng_state()
    a = (torch.rand(3), __import__("random").random())
    json_state = json.loads(json.dumps(state))
    ckpt.restore_rng_state(json_state)
    b = (torch.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
