"""Head-gated attention: Q/K/V/O projections for kept heads only, attention that skips the rest.

Layout. Q/K/V weights are packed once (:func:`pack_qkv`) KV-group-major:
``(n_kv_heads, G + 2, head_dim, hidden)`` with G = n_heads // n_kv_heads query heads
per KV head, then that group's K and V (for MHA, G = 1, this is the
``(n_heads, 3, head_dim, hidden)``; the layout is defined once, in ``dynprune.qkv_layout``,
and the gathered torch path uses the same pack). Each
``head_dim`` block of rows is a unit, so one *expand* launch
(:mod:`dynprune.kernels.gathered_gemm`) computes exactly the kept query heads of
every sample plus the K/V of every KV head that at least one kept query head of
that sample reads (GQA), into a (B, T, n_kv*(G+2)*head_dim) buffer in the same
layout. The attention kernel reads Q/K/V from that buffer; its grid is
(query block, sample x head) and a program whose head is skipped for its sample
returns before loading anything. The O projection is a *contract* over the kept
heads' columns of W_o. No O bias: the caller adds bias and residual.

Attention kernel: FlashAttention-2-style forward (online softmax in base 2, fp32
accumulators, K/V streamed in BLOCK_N tiles), key padding mask (``valid``;
blocks past a sample's last valid key are not visited), causal mask, GQA
(query head h reads KV head h // G). A query row with no valid key gets zeros
(PyTorch's SDPA gives NaN there).

Limits: fp32/fp16/bf16 (one dtype), head_dim <= 256 (padded to a power of two
>= 16 inside the kernel; multiples of 16 waste nothing), contiguous inputs,
self-attention only (queries and keys from the same T tokens, no KV cache: see
gated_decode.py for one new token against a cache), no RoPE/ALiBi (a decoder's
RoPE would be applied to the packed buffer between projection and attention).
Tiles: BLOCK_M/BLOCK_N powers of two in [16, 128]; defaults for H100 are untuned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from dynprune.kernels.common import (
    KeepLists,
    KernelInputError,
    as_keep,
    check_float,
    check_tensor,
    dot_precision,
    keep_from_mask,
    next_pow2,
    require_runnable,
    to_store,
    upcast_flag,
)
from dynprune.kernels.gathered_gemm import unit_contract, unit_expand
from dynprune.kernels.tiles import AttentionTiles, Tiles, default_attention_tiles

from dynprune.qkv_layout import pack_qkv as pack_qkv  # the one Q/K/V layout, for kernel users

Tensor = torch.Tensor
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- packing + keep lists
def qkv_keep(head_keep: Tensor, n_kv_heads: int) -> KeepLists:
    """(B, n_heads) bool -> keep lists over the packed Q/K/V units (no host sync)."""
    batch, n_heads = head_keep.shape
    q = head_keep.reshape(batch, n_kv_heads, n_heads // n_kv_heads)  # (B, n_kv, G)
    kv = q.any(dim=2, keepdim=True)  # (B, n_kv, 1): the KV head is read by a kept query head
    return keep_from_mask(torch.cat([q, kv, kv], dim=2).reshape(batch, -1))  # (B, n_kv*(G+2))


def _head_mask(
    head_keep: Tensor | KeepLists | list[list[int]], batch: int, n_heads: int, device: torch.device
) -> Tensor:
    if isinstance(head_keep, Tensor):
        check_tensor("head_keep", head_keep, (batch, n_heads), torch.bool, contiguous=False)
        if head_keep.device != device:
            raise KernelInputError(f"head_keep is on {head_keep.device} but the input is on {device}")
        return head_keep
    lists = as_keep(head_keep, batch, n_heads, device)
    used = torch.arange(n_heads, device=device)[None, :] < lists.count[:, None]
    target = torch.where(used, lists.idx.long(), n_heads)  # unused entries go to a spare column
    mask = torch.zeros(batch, n_heads + 1, dtype=torch.bool, device=device)
    return mask.scatter_(1, target, True)[:, :n_heads].contiguous()


# ----------------------------------------------------------------------------- references
def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_keep: Tensor,
    valid: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """q (B, nh, T, d), k/v (B, n_kv, T, d) -> (B, nh, T, d) in q's dtype; skipped heads and query
    rows without any valid key are zero."""
    batch, n_heads, seq, _ = q.shape
    group = n_heads // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    allowed = torch.ones(batch, 1, seq, seq, dtype=torch.bool, device=q.device)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    live = allowed.any(dim=-1, keepdim=True) & head_keep[:, :, None, None]  # (B, nh, T, 1)
    return torch.where(live, out, torch.zeros((), dtype=out.dtype, device=out.device))


def gated_attention_ref(
    x: Tensor,
    head_keep: Tensor,
    w_qkv: Tensor,
    b_qkv: Tensor | None,
    w_o: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    valid: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """Pure-PyTorch oracle of :func:`gated_attention` (dense math, skipped heads zeroed), x's dtype."""
    batch, seq, _ = x.shape
    n_kv = n_kv_heads or n_heads
    group = n_heads // n_kv
    d = w_qkv.shape[0] // (n_kv * (group + 2))
    qkv = F.linear(x, w_qkv, b_qkv).view(batch, seq, n_kv, group + 2, d)
    q = qkv[:, :, :, :group].reshape(batch, seq, n_heads, d).transpose(1, 2)  # (B, nh, T, d)
    k, v = (qkv[:, :, :, group + i].transpose(1, 2) for i in (0, 1))  # (B, n_kv, T, d)
    ctx = attention_ref(q, k, v, head_keep, valid, causal, scale)
    return ctx.transpose(1, 2).reshape(batch, seq, n_heads * d) @ w_o.t()


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _attention_kernel(
    qkv_ptr,
    out_ptr,
    keep_ptr,
    valid_ptr,
    kv_hi_ptr,
    T,
    n_heads,
    G,
    D,
    row_stride,
    out_stride,
    scale_log2,
    HAS_VALID: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if tl.load(keep_ptr + pid_bh) == 0:
        return  # head skipped for this sample: nothing is loaded or computed
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // G
    q_col = (kvh * (G + 2) + h % G) * D
    k_col = (kvh * (G + 2) + G) * D
    base = b.to(tl.int64) * T * row_stride
    t = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = t < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(
        qkv_ptr + base + t[:, None] * row_stride + q_col + d[None, :],
        mask=t_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    hi = T
    if HAS_VALID:
        hi = tl.load(kv_hi_ptr + b)  # keys past the last valid one are never visited
    if CAUSAL:
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < hi
        kt = tl.load(
            qkv_ptr + base + n[None, :] * row_stride + k_col + d[:, None],
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        vt = tl.load(
            qkv_ptr + base + n[:, None] * row_stride + k_col + D + d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # (BLOCK_M, BLOCK_N), base-2 logits
        ok = n_ok[None, :]
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * T + n, mask=n_ok, other=0) != 0)[None, :]
        if CAUSAL:
            ok = ok & (n[None, :] <= t[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no valid key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + b.to(tl.int64) * T * out_stride + t[:, None] * out_stride + h * D + d[None, :]
    tl.store(out_ptrs, to_store(out, out_ptr.dtype.element_ty, UPCAST), mask=t_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def head_attention(
    qkv: Tensor,
    head_keep: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    valid: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    out: Tensor | None = None,
    tiles: AttentionTiles | None = None,
) -> Tensor:
    """Attention of the kept heads from a packed Q/K/V buffer (B, T, n_kv*(G+2)*d) -> (B, T, nh*d).

    Columns of skipped heads are left as they are in ``out`` (pass a zeroed
    ``out`` to get zeros there). Only kept (sample, head) programs do any work.
    """
    check_tensor("qkv", qkv, (None, None, None))
    batch, seq, width = qkv.shape
    if n_heads % n_kv_heads:
        raise KernelInputError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    group = n_heads // n_kv_heads
    if width != n_kv_heads * (group + 2) * head_dim:
        raise KernelInputError(
            f"qkv width {width} != n_kv_heads*(G+2)*head_dim = {n_kv_heads}*{group + 2}*{head_dim}"
        )
    if not 1 <= head_dim <= 256:
        raise KernelInputError(f"head_dim={head_dim} is outside the supported range 1..256")
    check_float("qkv", qkv, qkv)
    check_tensor("head_keep", head_keep, (batch, n_heads), torch.bool)
    if valid is not None:
        check_tensor("valid", valid, (batch, seq), torch.bool)
    require_runnable(qkv, head_keep, valid, out, what="head_attention")
    if out is None:
        out = torch.empty(batch, seq, n_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    else:
        check_tensor("out", out, (batch, seq, n_heads * head_dim), qkv.dtype)
    if batch == 0 or seq == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    kv_hi = None
    if valid is not None:  # last valid key + 1 per sample (int32)
        positions = torch.arange(1, seq + 1, device=qkv.device, dtype=torch.int32)
        kv_hi = (valid.to(torch.int32) * positions).amax(dim=1).to(torch.int32)
    t = tiles or default_attention_tiles(seq, head_dim, qkv.dtype, qkv.is_cuda)
    t.check()
    grid = (triton.cdiv(seq, t.block_m), batch * n_heads)
    _attention_kernel[grid](
        qkv, out, head_keep.view(torch.uint8), valid.view(torch.uint8) if valid is not None else head_keep.view(torch.uint8),
        kv_hi if kv_hi is not None else head_keep,
        seq, n_heads, group, head_dim, width, n_heads * head_dim, scale * LOG2E,
        HAS_VALID=valid is not None, CAUSAL=bool(causal), UPCAST=upcast_flag(qkv.dtype),
        PREC=dot_precision(qkv.dtype), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_D=max(16, next_pow2(head_dim)), num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out


def gated_attention(
    x: Tensor,
    head_keep: Tensor | KeepLists | list[list[int]],
    w_qkv: Tensor,
    b_qkv: Tensor | None,
    w_o: Tensor,
    *,
    n_heads: int,
    n_kv_heads: int | None = None,
    valid: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    tiles: tuple[Tiles | None, AttentionTiles | None, Tiles | None] = (None, None, None),
) -> Tensor:
    """Head-gated self-attention of x (B, T, H) -> (B, T, H_out), without the O bias.

    head_keep: (B, n_heads) bool mask, KeepLists or lists of kept head indices per
    sample. w_qkv/b_qkv: packed by :func:`pack_qkv`; w_o (H_out, n_heads*d).
    valid: (B, T) bool key padding mask (True = real token). All heads skipped
    for a sample = zero output for it. ``tiles``: (qkv, attention, o) overrides.
    """
    check_tensor("x", x, (None, None, None))
    batch, _, hidden = x.shape
    n_kv = n_kv_heads or n_heads
    if n_heads <= 0 or n_kv <= 0 or n_heads % n_kv:
        raise KernelInputError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv}")
    group = n_heads // n_kv
    check_tensor("w_qkv", w_qkv, (None, hidden))
    if w_qkv.shape[0] % (n_kv * (group + 2)):
        raise KernelInputError(
            f"w_qkv has {w_qkv.shape[0]} rows, not a multiple of n_kv_heads*(G+2) = {n_kv * (group + 2)}; "
            "pack Q/K/V with pack_qkv"
        )
    d = w_qkv.shape[0] // (n_kv * (group + 2))
    check_tensor("w_o", w_o, (None, n_heads * d))
    for name, t in (("x", x), ("w_qkv", w_qkv), ("b_qkv", b_qkv), ("w_o", w_o)):
        if t is not None:
            check_float(name, t, x)
    if b_qkv is not None:
        check_tensor("b_qkv", b_qkv, (w_qkv.shape[0],))
    require_runnable(x, w_qkv, b_qkv, w_o, valid, what="gated_attention")
    mask = _head_mask(head_keep, batch, n_heads, x.device)
    qkv = unit_expand(
        x, w_qkv, b_qkv, qkv_keep(mask, n_kv), d, "none", tiles=tiles[0]
    )  # (B, T, n_kv*(G+2)*d)
    ctx = head_attention(
        qkv,
        mask.contiguous(),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=d,
        valid=valid,
        causal=causal,
        scale=scale,
        tiles=tiles[1],
    )  # (B, T, nh*d), kept heads' columns only
    return unit_contract(ctx, w_o, keep_from_mask(mask), d, tiles=tiles[2])
