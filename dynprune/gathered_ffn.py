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


def _ffn_by_runs(h: Tensor, acc: Tensor, plan: KindPlan, w: PackedWeights, s: int, act: Callable) -> None:
    """FFN up + activation by unit runs (the first rows × a run of slices), down by blocks."""
    _, seq, hidden = h.shape
    buf = h.new_empty(plan.blocks[-1].stop * seq, plan.blocks[0].n_units * s)  # (rows*T, c_max*s)
    for n_rows, u0, u1 in plan.unit_runs or ():
        up, b_up, _, _, _ = w.ffn(slice(u0 * s, u1 * s))
        dst = buf[: n_rows * seq, u0 * s : u1 * s]
        x = h[:n_rows].view(n_rows * seq, hidden)
        if b_up is not None:
            torch.addmm(b_up, x, up.t(), out=dst)
        else:
            torch.mm(x, up.t(), out=dst)
        out = apply_activation(act, dst)
        if out is not dst:
            dst.copy_(out)
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
    if plan.unit_runs is not None and w.parts.gate_proj is None:
        _ffn_by_runs(h, acc, plan, w, slice_size, act)
    else:
        for blk in plan.blocks:
            _ffn_block(h, acc, blk, w, slice_size, act)
