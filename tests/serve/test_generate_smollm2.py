"""The packaged SmolLM2-135M served straight from its GGUF file (`--model FILE.gguf`, open gates):
greedy output equals the unwrapped HF model's, and a budget below 1 is honoured. Slow: the
server process dequantises the 135M model itself (the session fixture is a second copy)."""

from __future__ import annotations

import httpx
import pytest

from dynprune.assets import smollm2_gguf
from tests.serve.server import ServerProcess

pytestmark = pytest.mark.slow


def test_smollm2_gguf_served_with_open_gates_equals_the_hf_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    proc = ServerProcess(
        ["--model", str(smollm2_gguf())],
        *("--max-batch", "2", "--max-texts", "2", "--max-queue", "8", "--timeout-s", "300"),
        log=tmp_path / "smollm2.log",
    ).wait_ready()
    try:
        prompt = "The capital of France is"
        ids = tokenizer(prompt, return_tensors="pt")
        want = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1] :]
        body = {"prompt": prompt, "max_new_tokens": 8, "temperature": 0, "budget": 1.0}
        r = httpx.post(f"{proc.url}/v1/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["token_ids"] == want.tolist()[: len(got["token_ids"])] and got["flops_ratio"] == 1.0
        kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        assert got["text"] == tokenizer.decode(got["token_ids"], **kw)
        r = httpx.post(f"{proc.url}/v1/generate", json={**body, "budget": 0.6}, timeout=300)
        assert r.status_code == 422 and "untrained" in r.json()["error"]["message"]  # --model: 1.0 only
    finally:
        assert proc.stop() == 0, proc.log()
