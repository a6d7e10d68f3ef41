"""Gathered attention, norm-agnostic: ``acc[rows] += Attn_units(x[rows]) @ W_O[:, units]ᵀ`` per block.

One piece serves encoders and decoders; what differs comes in :class:`AttentionInputs`:

- masks: a key-padding / HF 4D mask (bool, True = attend, or additive float),
  or none and ``causal`` (SDPA's ``is_causal``, prefill without padding);
- rotary position embeddings ``(cos, sin)`` (Llama family), applied to Q and K
  after projection, before caching;
- GQA: a unit is a KV group (``dynprune.qkv_layout``); SDPA's ``enable_gqa``
  lets query head j of a block read KV head j // G, no repeat;
- a KV cache (:class:`dynprune.kv_cache.BlockKV`): the block's K/V are appended
  to what it cached at earlier steps and attention runs over the whole past.
  Only kept units of kept rows are ever projected or stored.

Rows and masks are in plan order (the composer reorders them once per layer).
Shapes: x (n, T, H), acc (n, T, H); per block of ``k`` units of G query heads:
qkv (r*T, k*(G+2)*d) -> q (r, k*G, T, d), k/v (r, k, T, d) -> ctx (r*T, k*G*d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynprune.kv_cache import BlockKV
from dynprune.plan import Block, KindPlan
from dynprune.qkv_layout import PackedWeights

Tensor = torch.Tensor


@dataclass
class AttentionInputs:
    """Everything attention needs besides activations and weights, rows in plan order."""

    mask: Tensor | None = None  # (n | 1, 1, Tq | 1, Tk): bool (True = attend) or additive
    causal: bool = False  # causal attention where ``mask`` is None (is_causal)
    rope: tuple[Tensor, Tensor] | None = None  # cos, sin: (n | 1, Tq, d)
    scale: float | None = None  # softmax scale (None: 1/√d)
    cache: BlockKV | None = None  # this layer's cache (decoders with a GatedKVCache)


def rotate_half(t: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


def apply_rope(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """t (r, h, T, d), cos/sin (r | 1, T, d) -> rotated (HF's rotate-half convention)."""
    return t * cos[:, None] + rotate_half(t) * sin[:, None]


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    """Rows of a per-row tensor; one broadcast row (batch 1 mask / positions) stays as it is."""
    return t if t is None or t.shape[0] == 1 else t[rows]


def _attend(qkv: Tensor, blk: Block, index: int, seq: int, w: PackedWeights, inp: AttentionInputs) -> Tensor:
    """Packed Q/K/V of one block (r*T, k*(G+2)*d) -> attention context (r*T, k*G*d)."""
    n, k, g, d = blk.n_rows, blk.n_units, w.group, w.head_dim
    rows = slice(blk.start, blk.stop)
    if g == 1:
        q, kk, v = qkv.view(n, seq, k, 3, d).permute(3, 0, 2, 1, 4).unbind(0)  # each (n, k, T, d)
    else:
        t = qkv.view(n, seq, k, g + 2, d)
        q = t[:, :, :, :g].reshape(n, seq, k * g, d).transpose(1, 2)  # (n, k*G, T, d)
        kk, v = t[:, :, :, g].transpose(1, 2), t[:, :, :, g + 1].transpose(1, 2)  # (n, k, T, d)
    if inp.rope is not None:
        cos, sin = (_rows(c, rows) for c in inp.rope)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
    if inp.cache is not None:
        kk, v = inp.cache.append(index, kk, v)  # (n, k, T_past + T, d)
    mask = _rows(inp.mask, rows)
    ctx = F.scaled_dot_product_attention(
        q,
        kk,
        v,
        attn_mask=mask,
        is_causal=inp.causal and mask is None and seq > 1,
        scale=inp.scale,
        enable_gqa=g > 1,
    )  # (n, k*G, T, d)
    return ctx.transpose(1, 2).reshape(n * seq, k * g * d)  # a view when SDPA returns (n, T, k*G, d)


def attention(x: Tensor, acc: Tensor, plan: KindPlan, w: PackedWeights, inp: AttentionInputs) -> None:
    """acc[rows] += attention of each block's units over x[rows], projected by their O columns.

    Q/K/V are projected by the plan's unit runs when it has them (fewer, larger matmuls than
    one per block; results/cpu_bench/NOTES.md), else per block; O by blocks, or by unit runs at
    one token per row (decode: each weight slice read once, whatever the budgets in the batch)."""
    if not plan.blocks:
        return
    _, seq, hidden = x.shape
    width = w.unit_width
    if plan.unit_runs is not None:  # Q/K/V by unit runs: the first rows × a run of units
        buf = x.new_empty(plan.blocks[-1].stop * seq, plan.blocks[0].n_units * width)  # corners unread
        for n_rows, u0, u1 in plan.unit_runs:
            w_t, b, _ = w.attention(slice(u0, u1))
            dst = buf[: n_rows * seq, u0 * width : u1 * width]
            torch.addmm(b, x[:n_rows].view(n_rows * seq, hidden), w_t, out=dst)
        per_block = [buf[blk.start * seq : blk.stop * seq, : blk.n_units * width] for blk in plan.blocks]
    else:
        per_block = []
        for blk in plan.blocks:
            w_t, b, _ = w.attention(blk.units)
            per_block.append(torch.addmm(b, x[blk.start : blk.stop].view(blk.n_rows * seq, hidden), w_t))
    if plan.unit_runs is not None and seq == 1:  # decode: O by unit runs, each weight slice read once
        out_width = w.group * w.head_dim  # O columns of one unit
        ctx_buf = x.new_empty(plan.blocks[-1].stop, plan.blocks[0].n_units * out_width)  # corners unread
        for index, (blk, qkv) in enumerate(zip(plan.blocks, per_block)):
            ctx_buf[blk.start : blk.stop, : blk.n_units * out_width] = _attend(qkv, blk, index, seq, w, inp)
        for n_rows, u0, u1 in plan.unit_runs:
            _, _, w_out_t = w.attention(slice(u0, u1))
            dst = acc[:n_rows].view(n_rows, hidden)
            torch.addmm(dst, ctx_buf[:n_rows, u0 * out_width : u1 * out_width], w_out_t, out=dst)
        return
    for index, (blk, qkv) in enumerate(zip(plan.blocks, per_block)):
        ctx = _attend(qkv, blk, index, seq, w, inp)
        _, _, w_out_t = w.attention(blk.units)
        dst = acc[blk.start : blk.stop].view(blk.n_rows * seq, hidden)
        torch.addmm(dst, ctx, w_out_t, out=dst)  # in place; out= keeps FlopCounterMode counting it
