"""Gathered execution of one gated layer, PyTorch path (CPU): norm-agnostic pieces, two composers.

Only the kept head units' Q/K/V rows and O columns and the kept FFN slices are
multiplied; samples whose layer is skipped pass through unchanged. Work is
organised by :mod:`dynprune.plan`: samples in plan order, one *block* (rows ×
a run of units) per group of samples, each block one matmul on views of the
activations and of the (importance-ordered) weights.

Pieces (norm-agnostic; the accumulator starts as residual + output bias):

- attention (:mod:`dynprune.gathered_attention`): ``acc[r] += Attn_u(in[r]) W_O[:, u]ᵀ``
  with pluggable RoPE, GQA (a unit is a KV group), causal / padding masks and cache writes;
- FFN (:mod:`dynprune.gathered_ffn`): ``acc[r] += act(in[r] W_up[u]ᵀ + b) W_down[:, u]ᵀ``,
  GELU-style or SwiGLU.

Composers, chosen by ``ArchSpec.norm_position`` (dynprune/arch.py)::

    post-LN (BERT family)                    pre-LN (Llama family, GPT-2)
    a = x + b_O                              a = x + b_O
    a += Attn(x)                             a += Attn(N1(x))
    h = N1(a)                                h = a
    y = h + b_down;  y += FFN(h)             y = h + b_down;  y += FFN(N2(h))
    out = N2(y)                              out = y

rows back in batch order with one ``index_copy``; skipped samples = x. A layer
with no kept unit of a kind skips that piece entirely (nothing projected,
attended or cached). A layer costs ~10 ops for one sample (or one shared mask)
and ~3 more per extra block; the residual and bias are folded into the
accumulator, no zero buffers, no weight copies (nested gates).

Numerics: fp32 results equal the masked path (HF's layer with gate
multipliers) to ~1e-6 relative (different summation order); tests use
atol 1e-5 on logits (tests/fast_path, tests/core/test_decoders.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynprune.arch import LayerParts
from dynprune.gathered_attention import AttentionInputs, attention
from dynprune.gathered_ffn import ffn
from dynprune.plan import LayerPlan
from dynprune.qkv_layout import PackedWeights

Tensor = torch.Tensor


def _norm(norm: torch.nn.Module, t: Tensor) -> Tensor:
    """A LayerNorm module's function without the module-call overhead (other norms: called)."""
    if type(norm) is torch.nn.LayerNorm:
        return F.layer_norm(t, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(t)


def _rows_in_order(t: Tensor | None, order: Tensor | None) -> Tensor | None:
    """The plan's rows of ``t`` (a gather); ``t`` itself for the identity order or a broadcast row."""
    if t is None or order is None or t.shape[0] == 1:
        return t
    return t.index_select(0, order)


def _with_bias(t: Tensor, bias: Tensor | None) -> Tensor:
    return t.clone() if bias is None else t + bias


def _inputs_in_order(inp: AttentionInputs, order: Tensor | None) -> AttentionInputs:
    if order is None:
        return inp
    rope = None if inp.rope is None else tuple(_rows_in_order(t, order) for t in inp.rope)
    return AttentionInputs(_rows_in_order(inp.mask, order), inp.causal, rope, inp.scale, inp.cache)  # type: ignore[arg-type]


def _back_in_batch_order(x: Tensor, y: Tensor, plan: LayerPlan) -> Tensor:
    if plan.kept_rows is None:  # ffn order is the identity over the whole batch
        return y
    if plan.n_kept == x.shape[0]:
        return torch.empty_like(y).index_copy_(0, plan.kept_rows, y)
    return x.index_copy(0, plan.kept_rows, y)


def gathered_layer(
    x: Tensor,
    plan: LayerPlan,
    parts: LayerParts,
    weights: PackedWeights,
    slice_size: int,
    inputs: AttentionInputs,
    norm_position: str,
) -> Tensor:
    """One gathered layer: x (B, T, H) -> (B, T, H), original sample order."""
    if plan.n_kept == 0:
        return x
    if plan.attention.blocks or plan.ffn.blocks:
        weights.get()  # once per layer and forward: repacks / drops cached views if the weights changed
    order = plan.attention.order
    xa = _rows_in_order(x, order)  # (n, T, H), attention order
    assert xa is not None
    acc = _with_bias(xa, parts.o.bias)
    pre = norm_position == "pre"
    if plan.attention.blocks:
        attn_in = _norm(parts.attn_norm, xa) if pre else xa
        attention(attn_in, acc, plan.attention, weights, _inputs_in_order(inputs, order))
    h = acc if pre else _norm(parts.attn_norm, acc)
    if plan.ffn_from_attention is not None:
        h = h.index_select(0, plan.ffn_from_attention)  # -> ffn order
    y = _with_bias(h, parts.down.bias)
    if plan.ffn.blocks:
        ffn(_norm(parts.ffn_norm, h) if pre else h, y, plan.ffn, weights, slice_size, parts.act)
    if not pre:
        y = _norm(parts.ffn_norm, y)
    return _back_in_batch_order(x, y, plan)


def post_ln_layer(
    x: Tensor,
    valid: Tensor | None,
    plan: LayerPlan,
    parts: LayerParts,
    weights: PackedWeights,
    slice_size: int,
) -> Tensor:
    """One gathered post-LN encoder layer (key padding ``valid`` (B, T) bool or None)."""
    mask = None if valid is None else valid[:, None, None, :]  # (B, 1, 1, T)
    return gathered_layer(x, plan, parts, weights, slice_size, AttentionInputs(mask=mask), "post")
