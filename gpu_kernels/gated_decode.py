"""Head-gated decode attention: one new query token per sample against a KV cache.

For the decoder issue: ``out[b, h] = softmax(q[b, h] . K[b, h // G, :len_b] * scale) @ V[...]``
for the kept heads of each sample; skipped heads give zeros (so a dense O
projection or the gathered *contract* both see the right values).

Kernel: grid (sample x KV head, KV split). One program serves all G query heads
of a KV head (GQA packing: the G query rows share each K/V tile load, padded to
16 rows for the tensor-core dot); it returns at once when none of those heads is
kept for its sample. Long caches with few programs are split along the cache
(flash-decoding): each split writes an unnormalised partial (max, sum, acc) in
fp32 and a small combine kernel merges them; with one split the result is
written directly.

Limits: fp32/fp16/bf16 (q and caches share one dtype), head_dim <= 256, caches
(B, n_kv_heads, S_max, head_dim) with a contiguous last dimension (other strides
free, so a preallocated cache can be passed as is), ``cache_len`` (B,) int in
[0, S_max]: entries [0, cache_len) of every KV head that a kept query head reads
must be valid (the new token's K/V already appended). Lengths are clamped to
[0, S_max] in the kernel (no out-of-bounds read even for bad lengths) and
validated on the host unless ``trusted=True``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from dynprune.kernels.common import (
    KernelInputError,
    check_float,
    check_tensor,
    dot_precision,
    interpreting,
    next_pow2,
    require_runnable,
    to_store,
    upcast_flag,
)
from dynprune.kernels.gated_attention import LOG2E

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- reference
def decode_attention_ref(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    head_keep: Tensor,
    scale: float | None = None,
) -> Tensor:
    """q (B, nh, d), caches (B, n_kv, S, d), cache_len (B,), head_keep (B, nh) -> (B, nh, d), q's dtype."""
    batch, n_heads, d = q.shape
    group = n_heads // k_cache.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(batch):
        n = int(cache_len[b])
        if n == 0:
            continue
        k = k_cache[b, :, :n].repeat_interleave(group, dim=0)  # (nh, n, d)
        v = v_cache[b, :, :n].repeat_interleave(group, dim=0)
        attn = torch.softmax((q[b, :, None, :] @ k.transpose(1, 2)).float() * scale, dim=-1).to(q.dtype)
        ctx = (attn @ v)[:, 0]  # (nh, d)
        out[b] = torch.where(head_keep[b, :, None], ctx, torch.zeros((), dtype=q.dtype))
    return out


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    acc_ptr,
    ml_ptr,
    keep_ptr,
    len_ptr,
    n_heads,
    n_kv,
    G,
    D,
    S,
    chunk,
    n_split,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    scale_log2,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // n_kv
    kvh = pid % n_kv
    g = tl.arange(0, BLOCK_G)
    heads = kvh * G + g
    live = (tl.load(keep_ptr + b * n_heads + heads, mask=g < G, other=0) != 0) & (g < G)
    if tl.max(live.to(tl.int32), axis=0) == 0:
        return  # no kept query head reads this KV head in this sample
    length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), S)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_rows = b * n_heads + heads  # (BLOCK_G,)
    q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < hi
        kt = tl.load(
            k_base + n[None, :] * stride_ks + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0
        )
        vt = tl.load(
            v_base + n[:, None] * stride_vs + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PREC) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    if SPLIT:  # unnormalised partial of this split: (B, nh, n_split, [D | 2])
        part = q_rows * n_split + split
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=live[:, None] & d_ok[None, :])
        tl.store(ml_ptr + part * 2, m_i, mask=live)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=live)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * D + d[None, :],
            to_store(out, out_ptr.dtype.element_ty, UPCAST),
            mask=live[:, None] & d_ok[None, :],
        )


@triton.jit
def _combine_kernel(
    out_ptr,
    acc_ptr,
    ml_ptr,
    keep_ptr,
    D,
    n_split,
    UPCAST: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # b * n_heads + h
    if tl.load(keep_ptr + row) == 0:
        return
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_split
    d = tl.arange(0, BLOCK_D)
    m = tl.load(ml_ptr + (row * n_split + s) * 2, mask=s_ok, other=float("-inf"))
    l_s = tl.load(ml_ptr + (row * n_split + s) * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # (BLOCK_S,), 0 for empty splits
    acc = tl.load(
        acc_ptr + (row * n_split + s)[:, None] * D + d[None, :],
        mask=s_ok[:, None] & (d < D)[None, :],
        other=0.0,
    )
    total = tl.sum(w * l_s, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + row * D + d, to_store(out, out_ptr.dtype.element_ty, UPCAST), mask=d < D)


# ----------------------------------------------------------------------------- launcher
def _splits(programs: int, length: int, block_n: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), triton.cdiv(length, 4 * block_n), 32))


def gated_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    head_keep: Tensor,
    *,
    scale: float | None = None,
    n_split: int | None = None,
    block_n: int | None = None,
    trusted: bool = False,
) -> Tensor:
    """One-token attention of the kept heads: q (B, nh, d) against caches (B, n_kv, S, d) -> (B, nh, d).

    Skipped heads (and samples with cache_len 0) give zeros. ``n_split``: KV
    splits (default: enough programs to fill the GPU; 1 under the interpreter).
    """
    check_tensor("q", q, (None, None, None))
    batch, n_heads, d = q.shape
    check_tensor("k_cache", k_cache, (batch, None, None, d), contiguous=False)
    n_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    check_tensor("v_cache", v_cache, (batch, n_kv, s_max, d), contiguous=False)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_float(name, t, q)
        if t.stride(-1) != 1:
            raise KernelInputError(
                f"{name} needs a contiguous last (head_dim) dimension; strides {t.stride()}"
            )
    check_float("q", q, q)
    if n_kv == 0 or n_heads % n_kv:
        raise KernelInputError(f"n_heads={n_heads} (q) is not a multiple of the cache's n_kv_heads={n_kv}")
    if not 1 <= d <= 256:
        raise KernelInputError(f"head_dim={d} is outside the supported range 1..256")
    check_tensor("head_keep", head_keep, (batch, n_heads), torch.bool)
    check_tensor("cache_len", cache_len, (batch,), (torch.int32, torch.int64), contiguous=False)
    require_runnable(q, k_cache, v_cache, cache_len, head_keep, what="gated_decode_attention")
    if not trusted and batch:
        lengths = cache_len.cpu()
        bad = (lengths < 0) | (lengths > s_max)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise KernelInputError(f"cache_len[{b}] = {int(lengths[b])} is outside [0, {s_max}] (cache size)")
    out = torch.zeros_like(q)
    if batch == 0:
        return out
    group = n_heads // n_kv
    block_n = block_n or (64 if q.device.type == "cuda" else 128)
    block_d = max(16, next_pow2(d))
    splits = n_split or _splits(batch * n_kv, s_max, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(max(s_max, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(max(s_max, 1), chunk))
    lens = cache_len.to(torch.int32).contiguous()
    keep = head_keep.view(torch.uint8)
    upcast = upcast_flag(q.dtype)
    if splits > 1:
        acc = torch.empty(batch * n_heads * splits * d, dtype=torch.float32, device=q.device)
        ml = torch.empty(batch * n_heads * splits * 2, dtype=torch.float32, device=q.device)
    else:
        acc = ml = out  # unused
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    _decode_kernel[(batch * n_kv, splits)](
        q, k_cache, v_cache, out, acc, ml, keep, lens,
        n_heads, n_kv, group, d, s_max, chunk, splits,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), scale * LOG2E,
        SPLIT=splits > 1, UPCAST=upcast, PREC=dot_precision(q.dtype),
        BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=4, num_stages=2 if interpreting() else 3,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(batch * n_heads,)](
            out, acc, ml, keep, d, splits, UPCAST=upcast, BLOCK_S=max(2, next_pow2(splits)), BLOCK_D=block_d
        )
    return out
