"""Gated layers: the HF layer's own class, extended in place (state-dict keys unchanged).

Masked path (training): the HF layer runs as usual; pre-hooks on its O and
FFN-down projections multiply their inputs by the head and slice gates, and
the layer gate mixes output and input: ``z * layer(x) + (1 - z) * x``.

Gathered path (inference): the layer's forward is replaced by the gathered
computation (:mod:`dynprune.gathered`, or the Triton kernels on CUDA), which
only multiplies kept units and passes skipped samples through.

When no gates are set (budget 1.0, or the HF model called directly), the
original forward runs untouched.

Decoder layers (Llama family, GPT-2) take their causal mask, rotary
embeddings and cache from the HF layer's own arguments (matched by name with
the HF layer's signature, whatever positions HF passes them in); the cache must
be a :class:`dynprune.kv_cache.GatedKVCache` (GatedModel makes one).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dynprune.arch import LayerParts
from dynprune.flops import FlopsModel
from dynprune.gates import Gates, UnitMasks
from dynprune.gathered import gathered_layer
from dynprune.gathered_attention import AttentionInputs
from dynprune.kv_cache import GatedKVCache
from dynprune.plan import plan_forward
from dynprune.qkv_layout import PackedWeights
from dynprune.state import GateState


@dataclass
class LayerBinding:
    state: GateState
    index: int  # index among gated layers
    parts: LayerParts
    n_heads: int
    head_dim: int
    slice_size: int
    norm_position: str
    qkv: PackedWeights
    flops: FlopsModel | None = None  # unit costs for the gathered path's planner (block merging)
    causal: bool = False  # decoder layer: mask / RoPE / cache from the HF layer's arguments


def _hard_masks(state: GateState, gates: Gates) -> UnitMasks:
    """The forward's hard masks, computed once and shared by every layer: the router's (canonical)
    masks when it made them, else derived from the gates."""
    if state.hard_masks is None:
        info = state.info
        state.hard_masks = info.masks if info is not None and info.masks is not None else gates.masks()
    return state.hard_masks


class GatedLayerMixin:
    """Mixed into the HF layer's class by :func:`gate_layer`."""

    _dynprune: LayerBinding

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        b = self._dynprune
        state = b.state
        gates = state.gates if state.active else None
        if gates is None:
            return super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        if state.gathered:
            if state.backend == "triton":
                from dynprune.kernels.dispatch import gathered_layer as triton_layer  # lazy: optional

                m = _hard_masks(state, gates)
                i = b.index
                return triton_layer(hidden_states, state.valid, m.head[:, i], m.ffn[:, i], m.layer[:, i], b)
            if state.plans is None:
                m = _hard_masks(state, gates)
                state.plans = plan_forward(m.head, m.ffn, m.layer)
            plan = state.plans[b.index]
            if not b.causal:
                mask = None if state.valid is None else state.valid[:, None, None, :]  # (B, 1, 1, T)
                inputs = AttentionInputs(mask=mask)
                return gathered_layer(
                    hidden_states, plan, b.parts, b.qkv, b.slice_size, inputs, b.norm_position
                )
            inputs, cache = _decoder_inputs(self, b, args, kwargs)
            out = gathered_layer(hidden_states, plan, b.parts, b.qkv, b.slice_size, inputs, b.norm_position)
            if cache is not None:
                cache.advance(hidden_states.shape[1])
            return out
        out = super().forward(hidden_states, *args, **kwargs)  # type: ignore[misc]
        z = gates.layer[:, b.index].to(hidden_states.dtype)[:, None, None]  # (B, 1, 1)
        if isinstance(out, tuple):
            return (z * out[0] + (1 - z) * hidden_states, *out[1:])
        return z * out + (1 - z) * hidden_states


_ARG_NAMES: dict[type, list[str]] = {}


def _named_args(layer: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The HF layer's arguments after ``hidden_states`` by name (positional ones included)."""
    base = type(layer)._dynprune_base  # type: ignore[attr-defined]
    names = _ARG_NAMES.get(base)
    if names is None:
        names = list(inspect.signature(base.forward).parameters)[2:]  # after self, hidden_states
        _ARG_NAMES[base] = names
    return {**dict(zip(names, args)), **kwargs}


def _decoder_inputs(layer: nn.Module, b: LayerBinding, args: tuple, kwargs: dict):
    """(AttentionInputs, this layer's BlockKV or None) from a decoder layer's HF arguments."""
    named = _named_args(layer, args, kwargs)
    cache = named.get("cache", named.get("past_key_values"))
    block_kv = None
    if cache is not None:
        if not isinstance(cache, GatedKVCache):
            raise TypeError(
                f"a gated decoder (budget < 1) needs a dynprune.GatedKVCache, got {type(cache).__name__}; "
                "use GatedModel.generate(...) or pass cache=gated.new_cache() (or use_cache=False)"
            )
        block_kv = cache.gated_layer(b.index)
    mask = named.get("attention_mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"the gathered path needs a tensor attention mask, got {type(mask).__name__}; load the model "
            "with attn_implementation='sdpa' or 'eager'"
        )
    rope = named.get("position_embeddings") if b.causal else None
    inputs = AttentionInputs(mask=mask, causal=True, rope=rope, scale=b.parts.scaling, cache=block_kv)
    return inputs, block_kv


_CLASS_CACHE: dict[type, type] = {}


def _gated_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Gated{cls.__name__}", (GatedLayerMixin, cls), {"_dynprune_base": cls})
    return _CLASS_CACHE[cls]


def _unit_hook(state: GateState, kind: str, index: int, n_units: int):
    """Pre-hook multiplying the projection input (..., n_units * width) by per-unit gates."""

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        gates = state.gates if state.active else None
        if gates is None or state.gathered:
            return None
        x = args[0]
        g = getattr(gates, kind)[:, index].to(x.dtype)  # (B, n_units)
        shape = x.shape  # (B, T, n_units * width)
        g = g.view(shape[0], *([1] * (len(shape) - 2)), n_units, 1)  # (B, 1, n_units, 1)
        x = (x.view(*shape[:-1], n_units, -1) * g).view(shape)
        return (x, *args[1:])

    return hook


def gate_layer(binding: LayerBinding) -> list[RemovableHandle]:
    """Turn one HF layer into a gated layer in place; returns hook handles."""
    layer = binding.parts.layer
    layer.__class__ = _gated_class(type(layer))
    layer.__dict__["_dynprune"] = binding
    n_slices = binding.parts.up.out_features // binding.slice_size
    return [
        binding.parts.o.register_forward_pre_hook(
            _unit_hook(binding.state, "head", binding.index, binding.n_heads)
        ),
        binding.parts.down.register_forward_pre_hook(
            _unit_hook(binding.state, "ffn", binding.index, n_slices)
        ),
    ]


def ungate_layer(layer: nn.Module) -> None:
    cls = type(layer)
    base = getattr(cls, "_dynprune_base", None)
    if base is not None:
        layer.__class__ = base
    layer.__dict__.pop("_dynprune", None)
