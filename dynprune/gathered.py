"""Gathered execution of one post-LN encoder layer (BERT family), PyTorch path.

Only the kept heads' Q/K/V rows and O columns and the kept FFN slices are
multiplied; samples whose layer is skipped pass through unchanged. Work is
organised by :mod:`dynprune.plan`: one matmul per group of samples that keep
the same units, on views of the (importance-ordered) weights.

Weights: Q/K/V are packed once into a head-major (n_heads, 3, head_dim,
hidden) tensor so that a run of heads is one contiguous view; the pack is
rebuilt when the source parameters change (version counters). O, FFN up and
FFN down are used in place (row/column views).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dynprune.arch import LayerParts
from dynprune.plan import KindPlan, LayerPlan, take_rows

Tensor = torch.Tensor


class PackedQKV:
    """Head-major packed Q/K/V weights of one layer, rebuilt when parameters change."""

    def __init__(self, parts: LayerParts, n_heads: int, head_dim: int) -> None:
        self.parts, self.n_heads, self.head_dim = parts, n_heads, head_dim
        self._key: tuple | None = None
        self.weight: Tensor | None = None  # (nh, 3, d, H)
        self.bias: Tensor | None = None  # (nh, 3, d)

    def _version(self) -> tuple:
        ps = [self.parts.q.weight, self.parts.k.weight, self.parts.v.weight]
        ps += [p for p in (self.parts.q.bias, self.parts.k.bias, self.parts.v.bias) if p is not None]
        return tuple((p.data_ptr(), p._version, p.dtype) for p in ps)

    def get(self) -> tuple[Tensor, Tensor]:
        key = self._version()
        if key != self._key:
            nh, d = self.n_heads, self.head_dim
            with torch.no_grad():
                ws = [
                    lin.weight.detach().reshape(nh, d, -1)
                    for lin in (self.parts.q, self.parts.k, self.parts.v)
                ]
                self.weight = torch.stack(ws, dim=1).contiguous()  # (nh, 3, d, H)
                bs = [
                    lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(nh * d)
                    for lin in (self.parts.q, self.parts.k, self.parts.v)
                ]
                self.bias = torch.stack([b.reshape(nh, d) for b in bs], dim=1).contiguous()  # (nh, 3, d)
            self._key = key
        assert self.weight is not None and self.bias is not None
        return self.weight, self.bias


def _bias_or_zero(lin: torch.nn.Linear) -> Tensor | float:
    return lin.bias if lin.bias is not None else 0.0


def _select_units(t: Tensor, units: slice | Tensor, dim: int) -> Tensor:
    return t[(slice(None),) * dim + (units,)] if isinstance(units, slice) else t.index_select(dim, units)


def _accumulate(acc: Tensor, rows: slice | Tensor, contrib: Tensor) -> None:
    """acc[rows] += contrib for acc (B, T, H) and contrib (n, T, H)."""
    if isinstance(rows, slice):
        acc[rows] += contrib
    else:
        acc.index_add_(0, rows, contrib)


def attention_block(
    x: Tensor, valid: Tensor | None, plan: KindPlan, parts: LayerParts, qkv: PackedQKV
) -> Tensor:
    """Sum over kept heads of (attention output @ O columns) for samples in plan order.

    x (B, T, H) already in plan order; returns (B, T, H) in plan order,
    without the O bias (the caller adds bias and residual).
    """
    batch, seq, hidden = x.shape
    d = qkv.head_dim
    w_qkv, b_qkv = qkv.get()
    w_o = parts.o.weight  # (H, nh * d)
    out = x.new_zeros(batch, seq, hidden)
    for g in plan.groups:
        xg = take_rows(x, g.rows)  # (n, T, H)
        n, k = g.n_rows, g.n_units
        w = _select_units(w_qkv, g.units, 0).reshape(k * 3 * d, hidden)  # (k*3*d, H)
        b = _select_units(b_qkv, g.units, 0).reshape(k * 3 * d)
        qkv_out = torch.addmm(b, xg.reshape(n * seq, hidden), w.t())  # (n*T, k*3*d)
        qkv_out = qkv_out.view(n, seq, k, 3, d)
        q, kk, v = (qkv_out[:, :, :, i].transpose(1, 2) for i in range(3))  # each (n, k, T, d)
        mask = None
        if valid is not None:
            vg = take_rows(valid, g.rows)  # (n, T)
            if not bool(vg.all()):
                mask = vg[:, None, None, :]  # (n, 1, 1, T)
        ctx = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask)  # (n, k, T, d)
        ctx = ctx.transpose(1, 2).reshape(n * seq, k * d)  # (n*T, k*d)
        if isinstance(g.units, slice):
            w_out = w_o[:, g.units.start * d : g.units.stop * d]  # (H, k*d) strided view
        else:
            w_out = w_o.view(hidden, -1, d).index_select(1, g.units).reshape(hidden, k * d)
        _accumulate(out, g.rows, (ctx @ w_out.t()).view(n, seq, hidden))
    return out


def ffn_block(h: Tensor, plan: KindPlan, parts: LayerParts, slice_size: int) -> Tensor:
    """Sum over kept FFN slices of act(h @ up_s + b) @ down_s, samples in plan order; no down bias."""
    batch, seq, hidden = h.shape
    w_up, b_up, w_down = parts.up.weight, parts.up.bias, parts.down.weight  # (I, H), (I,), (H, I)
    gate = parts.gate_proj
    act: Callable[[Tensor], Tensor] = parts.act
    out = h.new_zeros(batch, seq, hidden)
    for g in plan.groups:
        hg = take_rows(h, g.rows).reshape(g.n_rows * seq, hidden)  # (n*T, H)
        if isinstance(g.units, slice):
            cols: slice | Tensor = slice(g.units.start * slice_size, g.units.stop * slice_size)
        else:
            offs = torch.arange(slice_size, device=h.device)
            cols = (g.units[:, None] * slice_size + offs).reshape(-1)
        up = _select_units(w_up, cols, 0)
        pre = F.linear(hg, up, None if b_up is None else _select_units(b_up, cols, 0))  # (n*T, k*s)
        if gate is not None:
            gb = None if gate.bias is None else _select_units(gate.bias, cols, 0)
            inter = act(F.linear(hg, _select_units(gate.weight, cols, 0), gb)) * pre
        else:
            inter = act(pre)
        down = _select_units(w_down, cols, 1)  # (H, k*s)
        _accumulate(out, g.rows, (inter @ down.t()).view(g.n_rows, seq, hidden))
    return out


def _reorder(t: Tensor, order: Tensor | None) -> Tensor:
    return t if order is None else t.index_select(0, order)


def _inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for pos, sample in enumerate(order):
        inv[sample] = pos
    return inv


def post_ln_layer(
    x: Tensor,
    valid: Tensor | None,
    plan: LayerPlan,
    parts: LayerParts,
    qkv: PackedQKV,
    slice_size: int,
) -> Tensor:
    """One gathered post-LN encoder layer: x (B, T, H) -> (B, T, H), original sample order."""
    if plan.n_kept == 0:
        return x
    a_plan, f_plan = plan.attention, plan.ffn
    xa = _reorder(x, a_plan.order)
    va = None if valid is None else _reorder(valid, a_plan.order)
    attn = attention_block(xa, va, a_plan, parts, qkv)
    h = parts.attn_norm(attn + _bias_or_zero(parts.o) + xa)  # (B, T, H), attention order
    if f_plan.order_list != a_plan.order_list:
        inv_a = _inverse(a_plan.order_list)
        to_f = torch.as_tensor([inv_a[s] for s in f_plan.order_list], device=x.device)
        h = h.index_select(0, to_f)  # attention order -> ffn order
    ffn = ffn_block(h, f_plan, parts, slice_size)
    y = parts.ffn_norm(ffn + _bias_or_zero(parts.down) + h)  # ffn order
    if f_plan.order is not None:
        y = y.index_select(0, torch.as_tensor(_inverse(f_plan.order_list), device=x.device))
    if plan.n_kept < x.shape[0]:
        y = torch.where(plan.keep[:, None, None], y, x)
    return y
