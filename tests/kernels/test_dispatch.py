"""backend="triton": whole gated models on the kernels equal the gathered PyTorch path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dynprune.kernels.dispatch import activation_name
from transformers.activations import ACT2FN

import dynprune
from dynprune import GateConfig
from tests.helpers import ENCODER_TYPES, random_masks, tiny_batch, tiny_model
from tests.kernels.util import DEVICE

ROOT = Path(__file__).resolve().parents[2]


def _forward(
    model_type: str, backend: str, masks_seed: int, nested: bool, dtype=torch.float32, batch: int = 5
):
    gated = dynprune.wrap(tiny_model(model_type), GateConfig(backend=backend, ffn_slice_size=32)).eval()
    gated.to(DEVICE, dtype)
    inputs = {k: v.to(DEVICE) for k, v in tiny_batch(batch, 17).items()}
    masks = random_masks(gated, batch, 0.5, seed=masks_seed, nested=nested)
    with torch.no_grad():
        out = gated(**inputs, masks=masks, output_hidden_states=True)
    return out, masks


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_triton_backend_equals_torch_backend(model_type):
    """Per-sample head/slice/layer masks (some samples skip layers), padded batch, fp32, eval mode."""
    ref, masks = _forward(model_type, "torch", masks_seed=3, nested=model_type != "roberta")
    out, _ = _forward(model_type, "triton", masks_seed=3, nested=model_type != "roberta")
    assert not masks.layer.all() and masks.layer.any(), "the masks should skip some layers of some samples"
    assert len({tuple(r) for r in masks.head[:, 0].tolist()}) > 1, "samples should have different head masks"
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_triton_backend_bf16_model():
    """bf16 model: the kernel path is at least as close to fp32 as the PyTorch path, within 2x + eps."""
    ref32, _ = _forward("bert", "torch", masks_seed=5, nested=True, batch=3)
    ref16, _ = _forward("bert", "torch", masks_seed=5, nested=True, dtype=torch.bfloat16, batch=3)
    out, _ = _forward("bert", "triton", masks_seed=5, nested=True, dtype=torch.bfloat16, batch=3)
    last = out.hidden_states[-1]
    err = (last.float() - ref32.hidden_states[-1]).abs().max().item()
    base = (ref16.hidden_states[-1].float() - ref32.hidden_states[-1]).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)


def test_inference_only_backward_raises():
    gated = dynprune.wrap(tiny_model("bert"), GateConfig(backend="triton", ffn_slice_size=32)).eval()
    gated.to(DEVICE)
    masks = random_masks(gated, 2, 0.5, seed=1, skip_layers=False)
    out = gated(**{k: v.to(DEVICE) for k, v in tiny_batch(2, 5).items()}, masks=masks)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.logits.sum().backward()


@pytest.mark.parametrize(
    "act,name",
    [
        (ACT2FN["gelu"], "gelu"),
        (ACT2FN["gelu_new"], "gelu_tanh"),
        (torch.nn.ReLU(), "relu"),
        (ACT2FN["silu"], "silu"),
    ],
)
def test_activation_probe(act, name):
    assert activation_name(act) == name


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        activation_name(torch.tanh)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, dynprune\n"
        "from tests.helpers import tiny_model, tiny_batch, random_masks\n"
        "g = dynprune.wrap(tiny_model('bert'), dynprune.GateConfig(backend='triton', ffn_slice_size=32)).eval()\n"
        "try:\n"
        "    g(**tiny_batch(2, 5), masks=random_masks(g, 2, 0.5))\n"
        "except RuntimeError as err:\n"
        "    print('ERROR:', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "ERROR: GateConfig(backend='triton') cannot run on cpu tensors" in done.stdout
    assert "backend='torch'" in done.stdout and "TRITON_INTERPRET=1" in done.stdout
