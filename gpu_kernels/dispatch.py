"""The Triton backend of the gathered path: one gated encoder layer, called by dynprune.layers.

:func:`gathered_layer` has the semantics of :func:`dynprune.gathered.post_ln_layer`
(post-LN BERT-family layer; samples whose layer is skipped pass through
unchanged) and runs every matmul and the attention in the kernels of this
package, per sample, on kept heads and FFN slices only:

    qkv  = expand(x, packed Q/K/V, kept heads)          gathered_gemm  (B, T, nh*3*d)
    ctx  = attention(qkv, kept heads, key padding)      gated_attention (B, T, nh*d)
    h    = attn_norm(contract(ctx, W_o, kept heads) + b_o + x)
    mid  = expand(h, W_up, kept slices, fused act)      gathered_gemm  (B, T, I)
    y    = ffn_norm(contract(mid, W_down, kept slices) + b_down + h)
    out  = where(layer kept, y, x)

Backend choice lives in GatedModel._backend ("auto": triton on CUDA, torch on
CPU; GateConfig.backend overrides). Here, CPU tensors are accepted only under
TRITON_INTERPRET=1 (CI); otherwise a clear error says to use the torch backend.
The activation of the HF layer is identified by probing it (exact GELU, tanh
GELU, ReLU, SiLU), so any module or function computing one of those works.

Inference only: the kernels have no backward. The output still joins the
autograd graph when gradients are on, but backward through it raises instead of
silently dropping the gradient of attention/FFN weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from dynprune.kernels.common import require_runnable
from dynprune.kernels.gated_attention import gated_attention
from dynprune.kernels.gated_ffn import gated_ffn

if TYPE_CHECKING:
    from dynprune.layers import LayerBinding

Tensor = torch.Tensor

_CANDIDATES = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
_ACT_CACHE: dict[int, tuple[object, str]] = {}


def activation_name(act: object) -> str:
    """Which kernel activation an HF activation computes, found by probing it on fp32 values."""
    cached = _ACT_CACHE.get(id(act))
    if cached is not None and cached[0] is act:
        return cached[1]
    probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64).float()
    with torch.no_grad():
        got = act(probe)  # type: ignore[operator]
    for name, fn in _CANDIDATES.items():
        if torch.allclose(got, fn(probe), rtol=0, atol=2e-6):
            _ACT_CACHE[id(act)] = (act, name)
            return name
    raise NotImplementedError(
        f"the layer's activation {act!r} is none of {sorted(_CANDIDATES)}; the Triton kernels cannot "
        "run it. Use GateConfig(backend='torch') for this model."
    )


class _InferenceOnly(torch.autograd.Function):
    """Identity on the layer output whose backward raises (the kernels have no backward)."""

    @staticmethod
    def forward(ctx, out: Tensor, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        raise RuntimeError(
            "the Triton gathered path (GateConfig.backend='triton') is inference-only and has no "
            "backward; train with the masked path (model.train(), execution='masked') or use backend='torch'"
        )


def gathered_layer(
    hidden: Tensor,
    valid: Tensor | None,
    head_keep: Tensor,
    ffn_keep: Tensor,
    layer_keep: Tensor,
    binding: LayerBinding,
) -> Tensor:
    """One gated post-LN encoder layer on the Triton kernels: hidden (B, T, H) -> (B, T, H).

    valid (B, T) bool or None (key padding); head_keep (B, n_heads),
    ffn_keep (B, n_slices), layer_keep (B,) bool — per-sample masks.
    """
    if binding.norm_position != "post":
        raise NotImplementedError(
            f"the Triton gathered path supports post-LN encoder layers, not norm_position={binding.norm_position!r}"
        )
    require_runnable(hidden, what="GateConfig(backend='triton')")
    parts = binding.parts
    width = hidden.shape[-1]
    n_heads = binding.n_heads
    keep = layer_keep.to(torch.bool)
    heads = (head_keep.to(torch.bool) & keep[:, None]).contiguous()  # (B, nh)
    slices = (ffn_keep.to(torch.bool) & keep[:, None]).contiguous()  # (B, ns)
    with torch.no_grad():
        x = hidden.detach().contiguous()
        w_qkv, b_qkv = binding.qkv.get()  # (nh, 3, d, H), (nh, 3, d): dynprune.qkv_layout's MHA pack
        attn = gated_attention(
            x,
            heads,
            w_qkv.view(-1, width),
            b_qkv.view(-1),
            parts.o.weight.detach().contiguous(),
            n_heads=n_heads,
            valid=None if valid is None else valid.to(torch.bool).contiguous(),
        )  # (B, T, H), kept heads only, no O bias
        if parts.o.bias is not None:
            attn += parts.o.bias
        h = parts.attn_norm(attn + x)
        gate = parts.gate_proj
        ffn = gated_ffn(
            h.contiguous(),
            slices,
            parts.up.weight.detach().contiguous(),
            _detached(parts.up.bias),
            parts.down.weight.detach().contiguous(),
            slice_size=binding.slice_size,
            activation=activation_name(parts.act),
            w_gate=None if gate is None else gate.weight.detach().contiguous(),
            b_gate=None if gate is None else _detached(gate.bias),
        )  # (B, T, H), kept slices only, no down bias
        if parts.down.bias is not None:
            ffn += parts.down.bias
        y = parts.ffn_norm(ffn + h)
        out = torch.where(keep[:, None, None], y, x)
    if torch.is_grad_enabled():
        params = [p for p in parts.layer.parameters() if p.requires_grad]
        if hidden.requires_grad or params:
            return _InferenceOnly.apply(out, hidden, *params)
    return out


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().contiguous()
