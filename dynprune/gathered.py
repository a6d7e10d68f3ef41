"""Gathered execution of one post-LN encoder layer (BERT family), PyTorch path (CPU).

Only the kept heads' Q/K/V rows and O columns and the kept FFN slices are
multiplied; samples whose layer is skipped pass through unchanged. Work is
organised by :mod:`dynprune.plan`: samples in plan order, one *block* (rows ×
a run of units) per group of samples, each block one matmul on views of the
activations and of the (importance-ordered) weights.

Per layer, with ``x`` (B, T, H) and blocks of rows ``r`` keeping units ``u``::

    a = x[kept rows, attention order] + b_O                       (n, T, H)
    a[r] += SDPA(x[r] @ Wqkv[u]ᵀ + b_qkv[u]) @ W_O[:, u]ᵀ         per attention block (addmm_ in place)
    h = LN1(a)
    y = h[ffn order] + b_down
    y[r] += act(h[r] @ W_up[u]ᵀ + b_up[u]) @ W_down[:, u]ᵀ        per FFN block (addmm_ in place)
    out = LN2(y), rows put back in batch order; skipped samples = x

So a layer costs 10 ops for one sample (or one shared mask) and ~3 more per
extra block; the residual and bias are folded into the accumulator, no zero
buffers, no weight copies (nested gates). Merged blocks (see plan.py) zero
the contributions of units a row does not keep before the O / down matmul.

Weights: Q/K/V are packed once into a head-major (n_heads, 3, head_dim,
hidden) tensor so that a run of heads is one contiguous view; the pack is
rebuilt when the source parameters change (version counters). O, FFN up and
FFN down are used in place (row/column views).

Numerics: fp32 results equal the masked path (HF's layer with gate
multipliers) to ~1e-6 relative (different summation order); tests use
atol 1e-5 on logits (tests/fast_path).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from dynprune.arch import LayerParts
from dynprune.plan import Block, KindPlan, LayerPlan

Tensor = torch.Tensor

#: Per-sample (several blocks) layout of the expanding projections (Q/K/V, FFN up): True = by
#: unit runs over the first rows (fewer, larger matmuls), False = one per block; see NOTES.md.
UNIT_RUNS = True


class PackedQKV:
    """Weights of one gated layer as the gathered path uses them, rebuilt when parameters change.

    - ``get()``: head-major packed Q/K/V ``(n_heads, 3, head_dim, hidden)`` + bias
      ``(n_heads, 3, head_dim)`` (also read by the Triton kernels);
    - ``attention(units)`` / ``ffn(cols)``: the (transposed) weight *views* of a
      run of heads / FFN columns, cached per run while gradients are off (the
      same prefixes recur forward after forward; a view costs a few µs to make).
    """

    def __init__(self, parts: LayerParts, n_heads: int, head_dim: int) -> None:
        self.parts, self.n_heads, self.head_dim = parts, n_heads, head_dim
        self._key: tuple | None = None
        self.weight: Tensor | None = None  # (nh, 3, d, H)
        self.bias: Tensor | None = None  # (nh, 3, d)
        self._views: dict[tuple, tuple] = {}
        lins = [parts.q, parts.k, parts.v, parts.o, parts.up, parts.down, parts.gate_proj]
        self._params = [t for lin in lins if lin is not None for t in (lin.weight, lin.bias) if t is not None]

    def _version(self) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype) for p in self._params)

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
            self._views.clear()
            self._key = key
        assert self.weight is not None and self.bias is not None
        return self.weight, self.bias

    def attention(self, units: slice | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(W_qkv of the heads, transposed (H, k*3*d); their bias (k*3*d,); O columns, transposed (k*d, H))."""
        key = ("a", units.start, units.stop) if isinstance(units, slice) else None
        views = self._views.get(key) if key is not None else None
        if views is None:
            w_qkv, b_qkv = self.get()
            d, w_o = self.head_dim, self.parts.o.weight
            hidden = w_qkv.shape[-1]
            w = _units_of(w_qkv, units, 0).reshape(-1, hidden)  # (k*3*d, H), a view for a run
            b = _units_of(b_qkv, units, 0).reshape(-1)
            w_out = _units_of(w_o.view(w_o.shape[0], -1, d), units, 1).reshape(w_o.shape[0], -1)  # (H, k*d)
            views = (w.t(), b, w_out.t())
            if key is not None and not torch.is_grad_enabled():
                self._views[key] = views
        return views

    def ffn(self, cols: slice | Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor]:
        """(up rows (k*s, H), up bias, gate rows, gate bias, down columns transposed (k*s, H))."""
        key = ("f", cols.start, cols.stop) if isinstance(cols, slice) else None
        views = self._views.get(key) if key is not None else None
        if views is None:
            p = self.parts
            pick = lambda t: None if t is None else _units_of(t, cols, 0)  # noqa: E731
            gate = p.gate_proj
            views = (
                pick(p.up.weight),
                pick(p.up.bias),
                None if gate is None else pick(gate.weight),
                None if gate is None else pick(gate.bias),
                _units_of(p.down.weight, cols, 1).t(),
            )
            if key is not None and not torch.is_grad_enabled():
                self._views[key] = views
        return views


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
    return None


_ACT_CACHE: dict[int, Callable[[Tensor], Tensor] | None] = {}


def _apply_activation(act: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    key = id(act)
    if key not in _ACT_CACHE:
        _ACT_CACHE[key] = _inplace_activation(act)
    fast = _ACT_CACHE[key]
    if fast is not None:
        fast(t)
        return t
    return act(t)


def _units_of(t: Tensor, units: slice | Tensor, dim: int) -> Tensor:
    """Unit selection along ``dim``: a view for a run, a gather (copy) for an index tensor."""
    return t[(slice(None),) * dim + (units,)] if isinstance(units, slice) else t.index_select(dim, units)


def _expand_units(units: slice | Tensor, width: int, device: torch.device) -> slice | Tensor:
    """Unit run/indices -> column run/indices for units of ``width`` columns each."""
    if isinstance(units, slice):
        return slice(units.start * width, units.stop * width)
    offs = torch.arange(width, device=device)
    return (units[:, None] * width + offs).reshape(-1)


def _attention_block(x: Tensor, acc: Tensor, valid: Tensor | None, blk: Block, weights: PackedQKV) -> None:
    """acc[rows] += attention of the block's heads over x[rows], projected by their O columns."""
    rows = slice(blk.start, blk.stop)
    n, k, d = blk.n_rows, blk.n_units, weights.head_dim
    _, seq, hidden = x.shape
    w_t, b, w_out_t = weights.attention(blk.units)
    qkv = torch.addmm(b, x[rows].view(n * seq, hidden), w_t)  # (n*T, k*3*d)
    q, kk, v = qkv.view(n, seq, k, 3, d).permute(3, 0, 2, 1, 4).unbind(0)  # each (n, k, T, d)
    mask = None if valid is None else valid[rows][:, None, None, :]  # (n, 1, 1, T)
    ctx = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask).transpose(1, 2)  # (n, T, k, d)
    if blk.drop is not None:  # merged block: heads a row does not keep contribute nothing
        ctx = ctx.masked_fill(blk.drop[:, None, :, None], 0.0)
    ctx = ctx.reshape(n * seq, k * d)  # a view when SDPA returns its (n, T, k, d) layout
    dst = acc[rows].view(n * seq, hidden)
    torch.addmm(dst, ctx, w_out_t, out=dst)  # in place; out= keeps FlopCounterMode counting it


def _ffn_block(
    h: Tensor, acc: Tensor, blk: Block, weights: PackedQKV, slice_size: int, act: Callable
) -> None:
    """acc[rows] += act(h[rows] @ up_u + b) @ down_u for the block's FFN slices."""
    rows = slice(blk.start, blk.stop)
    n = blk.n_rows
    _, seq, hidden = h.shape
    up, b_up, gate, b_gate, down_t = weights.ffn(_expand_units(blk.units, slice_size, h.device))
    hg = h[rows].view(n * seq, hidden)  # (n*T, H)
    pre = F.linear(hg, up, b_up)  # (n*T, k*s)
    if gate is not None:  # SwiGLU-style: act(gate(h)) * up(h)
        inter = _apply_activation(act, F.linear(hg, gate, b_gate)).mul_(pre)
    else:
        inter = _apply_activation(act, pre)
    if blk.drop is not None:  # merged block: slices a row does not keep contribute nothing
        inter = inter.view(n, seq, blk.n_units, slice_size).masked_fill_(blk.drop[:, None, :, None], 0.0)
        inter = inter.view(n * seq, blk.n_units * slice_size)
    dst = acc[rows].view(n * seq, hidden)
    torch.addmm(dst, inter, down_t, out=dst)


def _norm(norm: torch.nn.Module, t: Tensor) -> Tensor:
    """A LayerNorm module's function without the module-call overhead (other norms: called)."""
    if type(norm) is torch.nn.LayerNorm:
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(t)


def _rows_in_order(t: Tensor, order: Tensor | None) -> Tensor:
    """The plan's rows of ``t`` (a gather), or ``t`` itself when the plan is the whole batch in order."""
    return t if order is None else t.index_select(0, order)


def _with_bias(t: Tensor, bias: Tensor | None) -> Tensor:
    return t.clone() if bias is None else t + bias


def attention_sublayer(
    x: Tensor, valid: Tensor | None, plan: KindPlan, parts: LayerParts, qkv: PackedQKV
) -> Tensor:
    """LN1(x + b_O + Σ_blocks attention) for the kept rows, in attention plan order: (n_kept, T, H)."""
    xa = _rows_in_order(x, plan.order)  # (n, T, H)
    va = None if valid is None else _rows_in_order(valid, plan.order)
    acc = _with_bias(xa, parts.o.bias)
    if plan.unit_runs is not None and UNIT_RUNS:
        _attention_by_runs(xa, acc, va, plan, qkv)
    else:
        for blk in plan.blocks:
            _attention_block(xa, acc, va, blk, qkv)
    return _norm(parts.attn_norm, acc)


def _attention_by_runs(
    x: Tensor, acc: Tensor, valid: Tensor | None, plan: KindPlan, weights: PackedQKV
) -> None:
    """Q/K/V by unit runs (the first rows × a run of heads: larger matmuls), attention and O by blocks."""
    _, seq, hidden = x.shape
    d = weights.head_dim
    width = plan.blocks[0].n_units * 3 * d
    buf = x.new_empty(plan.blocks[-1].stop * seq, width)  # (rows*T, c_max*3*d); unused corners never read
    for n_rows, u0, u1 in plan.unit_runs or ():
        w_t, b, _ = weights.attention(slice(u0, u1))
        dst = buf[: n_rows * seq, u0 * 3 * d : u1 * 3 * d]
        torch.addmm(b, x[:n_rows].view(n_rows * seq, hidden), w_t, out=dst)
    for blk in plan.blocks:
        n, k = blk.n_rows, blk.n_units
        rows = slice(blk.start, blk.stop)
        qkv = buf[blk.start * seq : blk.stop * seq, : k * 3 * d].view(n, seq, k, 3, d)
        q, kk, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (n, k, T, d)
        mask = None if valid is None else valid[rows][:, None, None, :]
        ctx = F.scaled_dot_product_attention(q, kk, v, attn_mask=mask).transpose(1, 2).reshape(n * seq, k * d)
        _, _, w_out_t = weights.attention(blk.units)
        dst = acc[rows].view(n * seq, hidden)
        torch.addmm(dst, ctx, w_out_t, out=dst)


def ffn_sublayer(h: Tensor, plan: KindPlan, parts: LayerParts, qkv: PackedQKV, slice_size: int) -> Tensor:
    """LN2(h + b_down + Σ_blocks FFN) for rows of ``h`` already in FFN plan order."""
    acc = _with_bias(h, parts.down.bias)
    if plan.unit_runs is not None and UNIT_RUNS and parts.gate_proj is None:
        _ffn_by_runs(h, acc, plan, qkv, slice_size, parts.act)
    else:
        for blk in plan.blocks:
            _ffn_block(h, acc, blk, qkv, slice_size, parts.act)
    return _norm(parts.ffn_norm, acc)


def _ffn_by_runs(h: Tensor, acc: Tensor, plan: KindPlan, weights: PackedQKV, s: int, act: Callable) -> None:
    """FFN up + activation by unit runs (the first rows × a run of slices), down by blocks."""
    _, seq, hidden = h.shape
    buf = h.new_empty(plan.blocks[-1].stop * seq, plan.blocks[0].n_units * s)  # (rows*T, c_max*s)
    for n_rows, u0, u1 in plan.unit_runs or ():
        up, b_up, _, _, _ = weights.ffn(slice(u0 * s, u1 * s))
        dst = buf[: n_rows * seq, u0 * s : u1 * s]
        torch.addmm(b_up, h[:n_rows].view(n_rows * seq, hidden), up.t(), out=dst) if b_up is not None else (
            torch.mm(h[:n_rows].view(n_rows * seq, hidden), up.t(), out=dst)
        )
        out = _apply_activation(act, dst)
        if out is not dst:
            dst.copy_(out)
    for blk in plan.blocks:
        rows = slice(blk.start, blk.stop)
        n, k = blk.n_rows, blk.n_units
        _, _, _, _, down_t = weights.ffn(slice(0, k * s))
        dst = acc[rows].view(n * seq, hidden)
        torch.addmm(dst, buf[blk.start * seq : blk.stop * seq, : k * s], down_t, out=dst)


def post_ln_layer(
    x: Tensor,
    valid: Tensor | None,
    plan: LayerPlan,
    parts: LayerParts,
    qkv: PackedQKV,
    slice_size: int,
) -> Tensor:
    """One gathered post-LN encoder layer: x (B, T, H) -> (B, T, H), original sample order."""
    n_kept = plan.n_kept
    if n_kept == 0:
        return x
    if plan.attention.blocks or plan.ffn.blocks:
        qkv.get()  # once per layer and forward: repacks / drops cached views if the weights changed
    h = attention_sublayer(x, valid, plan.attention, parts, qkv)  # attention order
    if plan.ffn_from_attention is not None:
        h = h.index_select(0, plan.ffn_from_attention)  # -> ffn order
    y = ffn_sublayer(h, plan.ffn, parts, qkv, slice_size)  # (n_kept, T, H), ffn order
    if plan.kept_rows is None:  # ffn order is the identity over the whole batch
        return y
    if n_kept == x.shape[0]:
        out = torch.empty_like(y)
        return out.index_copy_(0, plan.kept_rows, y)
    return x.index_copy(0, plan.kept_rows, y)
