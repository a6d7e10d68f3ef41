"""Gathered FFN, norm-agnostic: ``acc[rows] += act(h[rows] W_up[u]ᵀ + b) W_down[:, u]ᵀ`` per block.

GELU/ReLU-style FFNs (``up`` then activation) and SwiGLU (``act(gate(h)) *
up(h)``, Llama family) share one piece. Rows of ``h`` / ``acc`` are in the FFN
plan order; the composer (dynprune/gathered.py) chooses what ``h`` is (the
post-LN residual stream, or the pre-LN normed input). Shapes: h, acc (n, T, H);
per block of ``k`` slices of ``s`` columns: inter (r*T, k*s).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dynprune.plan import Block, KindPlan
from dynprune.qkv_layout import PackedWeights

Tensor = torch.Tensor


def _inplace_activation(act: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor] | None:
    """An in-place version of a known activation module (saves a temporary), else None."""
    inner = getattr(act, "act", None)  # transformers' GELUActivation keeps the function in .act
    name = type(act).__name__
    if (name == "GELUActivation" and inner is F.gelu) or (
        isinstance(act, torch.nn.GELU) and act.approximate == "none"
    ):
        return torch.ops.aten.gelu_
    if isinstance(act, torch.nn.ReLU) or name == "ReLUActivation":
        return torch.relu_
    if isinstance(act, torch.nn.SiLU) or name == "SiLUActivation":
        return torch.ops.aten.silu_
    return None


_ACT_CACHE: dict[int, tuple[object, Callable[[Tensor], Tensor] | None]] = {}


def apply_activation(act: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """act(t), in place on ``t`` when the activation is a known one."""
    cached = _ACT_CACHE.get(id(act))
    if cached is None or cached[0] is not act:
        cached = (act, _inplace_activation(act))
        _ACT_CACHE[id(act)] = cached
    fast = cached[1]
    if fast is not None:
        fast(t)
        return t
    return act(t)


def _ffn_block(h: Tensor, acc: Tensor, blk: Block, w: PackedWeights, s: int, act: Callable) -> None:
    rows = slice(blk.start, blk.stop)
    n = blk.n_rows
    _, seq, hidden = h.shape
    up, b_up, gate, b_gate, down_t = w.ffn_units(blk.units, s)
    hg = h[rows].view(n * seq, hidden)  # (n*T, H)
    pre = F.linear(hg, up, b_up)  # (n*T, k*s)
    if gate is not None:  # SwiGLU: act(gate(h)) * up(h)
        inter = apply_activation(act, F.linear(hg, gate, b_gate)).mul_(pre)
    else:
        inter = apply_activation(act, pre)
    dst = acc[rows].view(n * seq, hidden)
    torch.addmm(dst, inter, down_t, out=dst)


def _project(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """out = x weightᵀ + bias, written into ``out`` (a view of a buffer)."""
    if bias is not None:
        torch.addmm(bias, x, weight.t(), out=out)
    else:
        torch.mm(x, weight.t(), out=out)


def _ffn_by_runs(h: Tensor, acc: Tensor, plan: KindPlan, w: PackedWeights, s: int, act: Callable) -> None:
    """FFN up (and gate) + activation by unit runs (the first rows × a run of slices); down by
    blocks, or by runs too at one token per row (decode): each weight slice is then read once
    however many budgets the batch holds, which is what a memory-bound step pays for."""
    _, seq, hidden = h.shape
    runs = plan.unit_runs or []
    shape = (plan.blocks[-1].stop * seq, plan.blocks[0].n_units * s)  # (rows*T, c_max*s), corners unread
    buf = h.new_empty(shape)
    gate_buf = h.new_empty(shape) if w.parts.gate_proj is not None else None
    for n_rows, u0, u1 in runs:
        up, b_up, gate, b_gate, _ = w.ffn(slice(u0 * s, u1 * s))
        x = h[:n_rows].view(n_rows * seq, hidden)
        dst = buf[: n_rows * seq, u0 * s : u1 * s]
        _project(x, up, b_up, dst)
        if gate_buf is not None:  # SwiGLU: act(gate(h)) * up(h)
            gated = gate_buf[: n_rows * seq, u0 * s : u1 * s]
            _project(x, gate, b_gate, gated)
            dst.mul_(apply_activation(act, gated))
        else:
            out = apply_activation(act, dst)
            if out is not dst:
                dst.copy_(out)
    if seq == 1:
        for n_rows, u0, u1 in runs:
            _, _, _, _, down_t = w.ffn(slice(u0 * s, u1 * s))
            dst = acc[:n_rows].view(n_rows, hidden)
            torch.addmm(dst, buf[:n_rows, u0 * s : u1 * s], down_t, out=dst)
        return
    for blk in plan.blocks:
        n, k = blk.n_rows, blk.n_units
        _, _, _, _, down_t = w.ffn(slice(0, k * s))
        dst = acc[blk.start : blk.stop].view(n * seq, hidden)
        torch.addmm(dst, buf[blk.start * seq : blk.stop * seq, : k * s], down_t, out=dst)


def ffn(
    h: Tensor,
    acc: Tensor,
    plan: KindPlan,
    w: PackedWeights,
    slice_size: int,
    act: Callable,
) -> None:
    """acc[rows] += FFN of each block's slices over h[rows] (up by the plan's unit runs if any)."""
    if plan.unit_runs is not None:
        _ffn_by_runs(h, acc, plan, w, slice_size, act)
    else:
        for blk in plan.blocks:
            _ffn_block(h, acc, blk, w, slice_size, act)
