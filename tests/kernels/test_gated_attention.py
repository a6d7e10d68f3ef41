"""Head-gated attention (packed QKV expand + attention kernel + O contract) vs the PyTorch oracle."""

from __future__ import annotations

import pytest
import torch
from dynprune.kernels.common import KernelInputError
from dynprune.kernels.gated_attention import (
    attention_ref,
    gated_attention,
    gated_attention_ref,
    head_attention,
    pack_qkv,
    qkv_keep,
)
from dynprune.kernels.gathered_gemm import unit_expand
from dynprune.kernels.tiles import AttentionTiles, Tiles

from tests.kernels.util import DEVICE, DTYPE_IDS, DTYPES, assert_rule, keep_mask, rand, weight

# (batch, seq, hidden, n_heads, n_kv_heads, head_dim, keep, causal, padded)
GRID = [
    (1, 1, 64, 2, 2, 32, 1.0, False, False),
    (3, 17, 72, 3, 3, 64, 0.5, False, True),
    (16, 128, 40, 2, 2, 32, "mixed", False, True),
    (16, 17, 48, 4, 2, 32, 0.5, True, False),  # GQA, causal
    (3, 128, 64, 4, 1, 32, 0.0, False, True),  # every head skipped: zero output
    (16, 1, 56, 2, 1, 64, "mixed", True, False),
    (1, 128, 64, 2, 2, 64, 1.0, True, True),
]


def _operands(hidden: int, n_heads: int, n_kv: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w_qkv, b_qkv = pack_qkv(
        weight(n_heads * d, hidden, g), weight(n_kv * d, hidden, g), weight(n_kv * d, hidden, g),
        rand(n_heads * d, gen=g, scale=0.3), rand(n_kv * d, gen=g, scale=0.3), rand(n_kv * d, gen=g, scale=0.3),
        n_heads, n_kv,
    )  # fmt: skip
    return w_qkv, b_qkv, weight(hidden, n_heads * d, g), g


def _valid(batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[0] = seq
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(DEVICE)


def _check(x, mask, w_qkv, b_qkv, w_o, dtype, what, tiles=(None, None, None), **kw):
    cast = [t.to(dtype) for t in (x, w_qkv, b_qkv, w_o)]
    out = gated_attention(cast[0], mask, *cast[1:], tiles=tiles, **kw)
    ref_dt = gated_attention_ref(cast[0], mask, *cast[1:], **kw)
    ref32 = gated_attention_ref(*(t.float() for t in cast[:1]), mask, *(t.float() for t in cast[1:]), **kw)
    assert_rule(out, ref32, ref_dt, what)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", GRID, ids=lambda c: "b{}-t{}-h{}-nh{}-kv{}-d{}-{}-causal{}-pad{}".format(*c))
def test_gated_attention_matches_reference(case, dtype):
    batch, seq, hidden, n_heads, n_kv, d, keep, causal, padded = case
    w_qkv, b_qkv, w_o, g = _operands(hidden, n_heads, n_kv, d, seed=batch * 7 + seq)
    x = rand(batch, seq, hidden, gen=g)
    mask = keep_mask(batch, n_heads, keep, g)
    valid = _valid(batch, seq, g) if padded else None
    out = _check(x, mask, w_qkv, b_qkv, w_o, dtype, f"{case} {dtype}", n_heads=n_heads, n_kv_heads=n_kv,
                 valid=valid, causal=causal)  # fmt: skip
    assert (out[~mask.any(1)] == 0).all(), "a sample with every head skipped must give exactly zero"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_tiles_boundaries(dtype):
    """16-wide tiles over 33 tokens: several query/key blocks with partial edges, GQA, causal + padding."""
    w_qkv, b_qkv, w_o, g = _operands(40, 4, 2, 32, seed=1)
    x = rand(3, 33, 40, gen=g)
    mask = keep_mask(3, 4, "mixed", g)
    mask[1] = torch.tensor([False, True, False, False], device=DEVICE)
    tiles = (Tiles(16, 16, 16), AttentionTiles(16, 16), Tiles(16, 16, 16))
    out = _check(x, mask, w_qkv, b_qkv, w_o, dtype, "small tiles", tiles=tiles, n_heads=4, n_kv_heads=2,
                 valid=_valid(3, 33, g), causal=True)  # fmt: skip
    assert out.shape == x.shape and torch.isfinite(out).all()  # the error rule is asserted in _check


def test_skipped_heads_exit_without_touching_anything():
    """NaN in the Q/K/V columns nobody reads and in the output buffer: skipped programs must not
    read them (kept outputs stay exact) nor write (their output columns stay NaN)."""
    batch, seq, n_heads, n_kv, d = 3, 20, 4, 2, 16
    g = torch.Generator().manual_seed(4)
    q = rand(batch, n_heads, seq, d, gen=g)
    kv = rand(batch, n_kv, 2, seq, d, gen=g)
    mask = torch.tensor([[True, False, False, False], [False, False, True, True], [False] * 4], device=DEVICE)
    group = n_heads // n_kv
    packed = torch.full((batch, seq, n_kv, group + 2, d), float("nan"), device=DEVICE)
    live_q = mask.view(batch, n_kv, group)
    live_kv = live_q.any(2)
    for b in range(batch):
        for kvh in range(n_kv):
            for j in range(group):
                if live_q[b, kvh, j]:
                    packed[b, :, kvh, j] = q[b, kvh * group + j]
            if live_kv[b, kvh]:
                packed[b, :, kvh, group:] = kv[b, kvh].transpose(0, 1)
    out = torch.full((batch, seq, n_heads * d), float("nan"), device=DEVICE)
    head_attention(packed.view(batch, seq, -1), mask, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d, out=out)
    ref = attention_ref(q, kv[:, :, 0], kv[:, :, 1], mask).transpose(1, 2).reshape(batch, seq, n_heads * d)
    cols = mask.repeat_interleave(d, dim=1)[:, None, :].expand_as(out)  # (B, T, nh*d) kept columns
    torch.testing.assert_close(out[cols], ref[cols], rtol=1e-5, atol=1e-5)
    assert torch.isnan(out[~cols]).all(), "a skipped (sample, head) program wrote its output"


def test_qkv_projection_computes_only_needed_units():
    """GQA: a KV head is projected iff a kept query head of that sample reads it."""
    mask = torch.tensor([[True, False, False, False], [False, False, False, True]], device=DEVICE)
    keep = qkv_keep(mask, n_kv_heads=2)  # units per KV group: q0 q1 k v
    want = [[0, 2, 3], [5, 6, 7]]
    for b in range(2):
        assert keep.idx[b, : int(keep.count[b])].tolist() == want[b]
    w_qkv, b_qkv, _, g = _operands(24, 4, 2, 16, seed=2)
    x = rand(2, 5, 24, gen=g)
    out = torch.full((2, 5, w_qkv.shape[0]), float("nan"), device=DEVICE)
    unit_expand(x, w_qkv, b_qkv, keep, 16, out=out)
    written = ~torch.isnan(out).view(2, 5, 8, 16).any(-1).any(1)  # (B, units)
    assert written.tolist() == [[u in w for u in range(8)] for w in want]


def test_query_rows_without_valid_keys_are_zero():
    w_qkv, b_qkv, w_o, g = _operands(32, 2, 2, 16, seed=3)
    x = rand(2, 6, 32, gen=g)
    valid = torch.tensor([[True] * 6, [False] * 6], device=DEVICE)
    mask = torch.ones(2, 2, dtype=torch.bool, device=DEVICE)
    out = gated_attention(x, mask, w_qkv, b_qkv, w_o, n_heads=2, valid=valid)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out, gated_attention_ref(x, mask, w_qkv, b_qkv, w_o, n_heads=2, valid=valid))


def test_head_lists_and_scale():
    w_qkv, b_qkv, w_o, g = _operands(32, 3, 3, 16, seed=9)
    x = rand(2, 7, 32, gen=g)
    mask = torch.tensor([[True, False, True], [False, True, False]], device=DEVICE)
    by_lists = gated_attention(x, [[2, 0], [1]], w_qkv, b_qkv, w_o, n_heads=3, scale=0.3)
    ref = gated_attention_ref(x, mask, w_qkv, b_qkv, w_o, n_heads=3, scale=0.3)
    torch.testing.assert_close(by_lists, ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    w_qkv, b_qkv, w_o, g = _operands(32, 4, 2, 16, seed=0)
    x = rand(2, 5, 32, gen=g)
    mask = torch.ones(2, 4, dtype=torch.bool, device=DEVICE)
    kw = dict(n_heads=4, n_kv_heads=2)
    with pytest.raises(KernelInputError, match=r"n_heads=4 must be a positive multiple of n_kv_heads=3"):
        gated_attention(x, mask, w_qkv, b_qkv, w_o, n_heads=4, n_kv_heads=3)
    with pytest.raises(KernelInputError, match=r"pack Q/K/V with pack_qkv"):
        gated_attention(x, mask, w_qkv[:-1].contiguous(), None, w_o, **kw)
    with pytest.raises(KernelInputError, match=r"head_keep has shape \(2, 3\), expected \(2, 4\)"):
        gated_attention(x, mask[:, :3], w_qkv, b_qkv, w_o, **kw)
    with pytest.raises(KernelInputError, match=r"index 4 .* out of range"):
        gated_attention(x, [[0, 4], []], w_qkv, b_qkv, w_o, **kw)
    with pytest.raises(KernelInputError, match=r"unit 1 is listed twice"):
        gated_attention(x, [[1, 1], []], w_qkv, b_qkv, w_o, **kw)
    with pytest.raises(KernelInputError, match=r"valid has shape \(2, 4\), expected \(2, 5\)"):
        gated_attention(
            x, mask, w_qkv, b_qkv, w_o, valid=torch.ones(2, 4, dtype=torch.bool, device=DEVICE), **kw
        )
    with pytest.raises(KernelInputError, match=r"valid has dtype torch.int64, expected torch.bool"):
        gated_attention(
            x, mask, w_qkv, b_qkv, w_o, valid=torch.ones(2, 5, dtype=torch.long, device=DEVICE), **kw
        )
    with pytest.raises(
        KernelInputError, match=r"w_o has dtype torch.bfloat16 but the input is torch.float32"
    ):
        gated_attention(x, mask, w_qkv, b_qkv, w_o.bfloat16(), **kw)
    with pytest.raises(KernelInputError, match=r"x must be contiguous"):
        gated_attention(x[:, ::2], mask, w_qkv, b_qkv, w_o, **kw)
    with pytest.raises(KernelInputError, match=r"head_dim=300 is outside the supported range"):
        head_attention(
            torch.zeros(1, 2, 900), torch.ones(1, 1, dtype=torch.bool), n_heads=1, n_kv_heads=1, head_dim=300
        )
    with pytest.raises(KernelInputError, match=r"w_k has shape"):
        pack_qkv(torch.zeros(64, 8), torch.zeros(30, 8), torch.zeros(32, 8), None, None, None, 4, 2)
