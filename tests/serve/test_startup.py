"""`dynprune serve` refuses to start, with a clear message and a non-zero exit, on bad input."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest
import torch

from dynprune.serve.cli import main
from tests.serve.models import save_tiny_checkpoint
from tests.serve.server import free_port


def refuse(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main([*argv, "--port", str(free_port())])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def test_missing_checkpoint(capsys, tmp_path):
    code, err = refuse(capsys, "--checkpoint", str(tmp_path / "nope"))
    assert code == 1 and "does not exist" in err


def test_corrupt_checkpoint(capsys, tmp_path, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "base" / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    code, err = refuse(capsys, "--checkpoint", str(ckpt))
    assert code == 1 and "could not be loaded" in err


def test_truncated_gates(capsys, tmp_path, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    gates = ckpt / "gates" / "gates.safetensors"
    gates.write_bytes(gates.read_bytes()[:40])
    code, err = refuse(capsys, "--checkpoint", str(ckpt))
    assert code == 1 and "could not be loaded" in err


def test_pickled_weights_are_refused(capsys, tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    code, err = refuse(capsys, "--model", str(model))
    assert code == 1 and "pickled" in err and "safetensors" in err


def test_checkpoint_for_another_model(capsys, tmp_path, tiny_checkpoint, minilm_dir):
    other = save_tiny_checkpoint(tmp_path / "other", minilm_dir, layers=3)
    mixed = shutil.copytree(tiny_checkpoint, tmp_path / "mixed")
    shutil.rmtree(mixed / "gates")
    shutil.copytree(other / "gates", mixed / "gates")
    code, err = refuse(capsys, "--checkpoint", str(mixed))
    assert code == 1 and "different model" in err and "n_layers" in err


def test_plain_model_dir_is_no_checkpoint(capsys, tiny_model_dir):
    code, err = refuse(capsys, "--checkpoint", str(tiny_model_dir))
    assert code == 1 and "serve it with --model" in err


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--max-batch", "0", "--max-batch must be a positive integer"),
        ("--max-batch", "-3", "--max-batch must be a positive integer"),
        ("--max-queue", "0", "--max-queue must be a positive integer"),
        ("--timeout-s", "0", "--timeout-s must be in (0, 3600]"),
        ("--max-wait-ms", "-1", "--max-wait-ms must be in [0, 60000)"),
        ("--host", "example.com", "--host must be an IP address"),
        ("--max-length", "100", "--max-length (100) must be a multiple of --pad-multiple (8)"),
    ],
)
def test_bad_limits_fail_before_loading(capsys, tiny_checkpoint, flag, value, says):
    code, err = refuse(capsys, "--checkpoint", str(tiny_checkpoint), flag, value)
    assert code == 2 and says in err


def test_port_in_use_is_a_non_zero_exit_of_the_real_command(tiny_checkpoint):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "dynprune.cli",
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--port",
            str(port),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr


def test_exactly_one_source(capsys, tiny_checkpoint, tiny_model_dir):
    code, err = refuse(capsys, "--checkpoint", str(tiny_checkpoint), "--model", str(tiny_model_dir))
    assert code == 2 and "not allowed with argument" in err


def test_a_corrupt_gguf_file_is_refused(capsys, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 50)
    code, err = refuse(capsys, "--model", str(bad))
    assert code == 1 and "GGUF model" in err and "could not be loaded" in err
