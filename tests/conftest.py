"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit module is
imported (it is read at decoration time), so it is set here, first."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def minilm_dir():
    """Path of the packaged MiniLM (part of the default install; fails loudly if missing)."""
    from dynprune.assets import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the packaged SmolLM2-135M, loaded once per session (11-16 s).
    Tests that wrap it must unwrap it again (dynprune.unwrap) so the next test gets the original."""
    from dynprune.assets import load_smollm2

    return load_smollm2()


@pytest.fixture(autouse=True)
def _reference_gathered_path(request, monkeypatch):
    """Outside tests/exec, GatedModel runs the PyTorch gathered path (the reference the ONNX Runtime
    engine is tested against in tests/exec), so those tests keep covering it and stay fast."""
    if "exec" not in request.node.path.parts:
        monkeypatch.setattr("dynprune.model.engine_for", lambda gated, device, kwargs=None, args=(): None)
