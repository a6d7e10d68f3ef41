"""Head-gated decode attention (one new token against a KV cache) vs the PyTorch oracle."""

from __future__ import annotations

import pytest
import torch
from dynprune.kernels.common import KernelInputError
from dynprune.kernels.gated_decode import decode_attention_ref, gated_decode_attention

from tests.kernels.util import DEVICE, DTYPE_IDS, DTYPES, assert_rule, keep_mask, rand

# (batch, n_heads, n_kv_heads, head_dim, cache size, splits, block_n, keep)
GRID = [
    (1, 2, 2, 32, 1, None, None, 1.0),
    (3, 4, 2, 64, 50, 3, 16, 0.5),  # GQA, KV split in 3 + combine
    (16, 4, 1, 32, 130, None, None, "mixed"),  # MQA
    (16, 2, 2, 64, 17, 2, 16, 0.0),  # nothing kept: zeros
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GRID, ids=lambda c: "b{}-nh{}-kv{}-d{}-S{}-split{}-bn{}-{}".format(*c))
def test_decode_matches_reference(case, dtype):
    batch, n_heads, n_kv, d, size, splits, block_n, keep = case
    g = torch.Generator().manual_seed(batch + size)
    q = rand(batch, n_heads, d, gen=g).to(dtype)
    # caches are views of bigger buffers (as a preallocated cache would be): strided, last dim contiguous
    k_cache = rand(batch, n_kv, size + 7, d, gen=g).to(dtype)[:, :, :size]
    v_cache = rand(batch, n_kv, size + 7, d, gen=g).to(dtype)[:, :, :size]
    lengths = torch.randint(0, size + 1, (batch,), generator=g)
    lengths[0] = size
    lengths = lengths.to(DEVICE)
    mask = keep_mask(batch, n_heads, keep, g)
    out = gated_decode_attention(q, k_cache, v_cache, lengths, mask, n_split=splits, block_n=block_n)
    ref_dt = decode_attention_ref(q, k_cache, v_cache, lengths, mask)
    ref32 = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), lengths, mask)
    assert_rule(out, ref32, ref_dt, f"decode {case} {dtype}")
    dead = ~mask[:, :, None].expand_as(out) | (lengths == 0)[:, None, None]
    assert (out[dead] == 0).all(), "skipped heads and empty caches must give exact zeros"


def test_bad_input():
    q = torch.zeros(2, 4, 16, device=DEVICE)
    cache = torch.zeros(2, 2, 8, 16, device=DEVICE)
    keep = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    lens = lambda *v: torch.tensor(v, device=DEVICE)  # noqa: E731
    with pytest.raises(KernelInputError, match=r"cache_len\[1\] = 9 is outside \[0, 8\]"):
        gated_decode_attention(q, cache, cache, lens(3, 9), keep)
    with pytest.raises(KernelInputError, match=r"cache_len\[0\] = -1"):
        gated_decode_attention(q, cache, cache, lens(-1, 2), keep)
    with pytest.raises(KernelInputError, match=r"k_cache needs a contiguous last"):
        gated_decode_attention(q, cache.transpose(2, 3).contiguous().transpose(2, 3), cache, lens(1, 1), keep)
    with pytest.raises(KernelInputError, match=r"not a multiple of the cache's n_kv_heads=3"):
        gated_decode_attention(q, torch.zeros(2, 3, 8, 16), torch.zeros(2, 3, 8, 16), lens(1, 1), keep)
    with pytest.raises(
        KernelInputError, match=r"v_cache has shape \(2, 2, 7, 16\), expected \(2, 2, 8, 16\)"
    ):
        gated_decode_attention(q, cache, cache[:, :, :7], lens(1, 1), keep)
    with pytest.raises(
        KernelInputError, match=r"k_cache has dtype torch.float16 but the input is torch.float32"
    ):
        gated_decode_attention(q, cache.half(), cache, lens(1, 1), keep)
    with pytest.raises(KernelInputError, match=r"cache_len has dtype torch.float32"):
        gated_decode_attention(q, cache, cache, lens(1.0, 1.0), keep)
