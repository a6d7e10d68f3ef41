"""Physically smaller dense models: keep given heads, FFN neurons and layers, drop the rest.

:func:`physically_prune` builds a plain HF model whose Q/K/V/O and FFN
Linear layers really are smaller (new ``nn.Linear`` modules holding copies of
the kept rows/columns) and whose removed layers are gone from the layer list.
It is what a static structured-pruning method ships, and the practical speed
limit for a gated model with the same kept units: same FLOPs, no gathers, no
planning (``dynprune bench cpu``'s ``limit_ms``).

Works for every family in :data:`dynprune.arch.ARCH_TABLE` (paths come from
the arch table). Semantics, per layer ``l``:

- ``heads_keep_per_layer[l]``: indices of the heads to keep (any order; they
  are kept in ascending order), in the model's *current* head order;
- ``ffn_keep_per_layer[l]``: indices of the FFN neurons (intermediate
  columns, not slices) to keep, likewise;
- ``layers_keep[l]`` (optional, default all True): False removes the layer
  (the layer becomes the identity, like a skipped layer of a gated model).

A layer with no head left runs no attention at all: its attention block adds
only the O bias (the self-attention module's ``forward`` is replaced by one
that returns a zero-width context, since HF's head reshape cannot infer a
head count from zero elements). A layer with no neuron left adds only the
down-projection bias. The result equals the masked model with the same kept
units (tested in tests/fast_path/test_physical.py).

The HF config is left as it was (``num_attention_heads`` etc. describe the
unpruned model); such a model is not meant to be re-saved with
``save_pretrained``/``from_pretrained``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dynprune.arch import get_attr_path, spec_for

Tensor = torch.Tensor

__all__ = ["physically_prune", "units_of_sample"]


def units_of_sample(gated: Any, masks: Any, row: int) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """One sample's kept units of a GatedModel as arguments for :func:`physically_prune`.

    ``masks`` (:class:`dynprune.UnitMasks`, positions in the gated model's
    importance order) -> per layer of the *whole* model (dense prefix layers
    included, fully kept): original head indices, original FFN neuron indices,
    and whether the layer runs.
    """
    m = masks.canonical()
    cfg = gated.gate_config
    n_heads, ffn_dim, s = gated.parts.n_heads, gated.parts.ffn_dim, cfg.ffn_slice_size
    heads = [list(range(n_heads)) for _ in range(cfg.router_layer)]
    neurons = [list(range(ffn_dim)) for _ in range(cfg.router_layer)]
    layers = [True] * cfg.router_layer
    for i in range(m.layer.shape[1]):
        pos = m.head[row, i].nonzero().flatten().cpu()
        heads.append(sorted(gated.head_perm[i].cpu()[pos].tolist()))
        slices = m.ffn[row, i].nonzero().flatten().cpu()
        cols = (slices[:, None] * s + torch.arange(s)).reshape(-1)
        neurons.append(sorted(gated.ffn_perm[i].cpu()[cols].tolist()))
        layers.append(bool(m.layer[row, i]))
    return heads, neurons, layers


def _linear_from(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly ``weight`` (out, in) and ``bias`` (no init, works for size 0)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.out_features, lin.in_features = int(weight.shape[0]), int(weight.shape[1])
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias.detach().clone().contiguous(), requires_grad=False)
    return lin


def _set_attr_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_attr_path(root, parent_path) if parent_path else root
    setattr(parent, name, value)


def _rows(lin: nn.Linear, index: Tensor) -> nn.Linear:
    """Keep output features ``index``."""
    bias = None if lin.bias is None else lin.bias.index_select(0, index)
    return _linear_from(lin.weight.index_select(0, index), bias)


def _cols(lin: nn.Linear, index: Tensor) -> nn.Linear:
    """Keep input features ``index``."""
    return _linear_from(lin.weight.index_select(1, index), lin.bias)


class _NoHeadsAttention:
    """Mixed into a self-attention module left with zero heads: returns a zero-width context
    (or, where the module owns the O projection, its bias) and no attention weights."""

    _physical_o: nn.Module | None

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (B, T, 0)
        if self._physical_o is not None:
            out = self._physical_o(out)  # (B, T, H): the O bias
        return out, None


_NO_HEADS_CLASSES: dict[type, type] = {}


def _no_heads_class(cls: type) -> type:
    if cls not in _NO_HEADS_CLASSES:
        _NO_HEADS_CLASSES[cls] = type(f"NoHeads{cls.__name__}", (_NoHeadsAttention, cls), {})
    return _NO_HEADS_CLASSES[cls]


def _as_index(values: Sequence[int] | Tensor, size: int, what: str) -> Tensor:
    idx = torch.as_tensor(values, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(f"{what}: indices must be in [0, {size}), got {idx.tolist()}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"{what}: duplicated indices {idx.tolist()}")
    return idx.sort().values


def physically_prune(
    model: nn.Module,
    heads_keep_per_layer: Sequence[Sequence[int] | Tensor],
    ffn_keep_per_layer: Sequence[Sequence[int] | Tensor],
    layers_keep: Sequence[bool] | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """A really smaller dense copy of ``model`` keeping the given units (see module docstring).

    ``model`` must be a plain (unwrapped) supported HF model; by default it is
    deep-copied and left untouched (``inplace=True`` prunes it in place).
    """
    if getattr(model, "_dynprune_wrapped", False):
        raise ValueError(
            "physically_prune needs a plain HF model, not one wrapped by dynprune "
            "(unwrap it, or prune a fresh copy of the base model)"
        )
    spec = spec_for(model)
    backbone = getattr(model, "base_model", model)
    layers = get_attr_path(backbone, spec.layers)
    assert isinstance(layers, nn.ModuleList)
    n_layers = len(layers)
    keep_layers = [True] * n_layers if layers_keep is None else [bool(k) for k in layers_keep]
    if not (len(heads_keep_per_layer) == len(ffn_keep_per_layer) == len(keep_layers) == n_layers):
        raise ValueError(
            f"physically_prune: the model has {n_layers} layers; got {len(heads_keep_per_layer)} head lists, "
            f"{len(ffn_keep_per_layer)} FFN lists and {len(keep_layers)} layer flags"
        )
    n_heads = int(getattr(model.config, "num_attention_heads", getattr(model.config, "n_heads", 0)))
    if not inplace:
        model = copy.deepcopy(model)
        backbone = getattr(model, "base_model", model)
        layers = get_attr_path(backbone, spec.layers)
        assert isinstance(layers, nn.ModuleList)
    head_dim = get_attr_path(layers[0], spec.q).out_features // n_heads  # type: ignore[union-attr]

    with torch.no_grad():
        for i, layer in enumerate(layers):
            if not keep_layers[i]:
                continue
            q = get_attr_path(layer, spec.q)
            assert isinstance(q, nn.Linear)
            heads_now = q.out_features // head_dim
            heads = _as_index(heads_keep_per_layer[i], heads_now, f"layer {i} heads")
            rows = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (k*d,)
            for path in (spec.q, spec.k, spec.v):
                _set_attr_path(layer, path, _rows(get_attr_path(layer, path), rows))  # type: ignore[arg-type]
            _set_attr_path(layer, spec.o, _cols(get_attr_path(layer, spec.o), rows))  # type: ignore[arg-type]
            up = get_attr_path(layer, spec.up)
            assert isinstance(up, nn.Linear)
            neurons = _as_index(ffn_keep_per_layer[i], up.out_features, f"layer {i} FFN neurons")
            for path in (spec.up, spec.gate_proj):
                if path is not None:
                    _set_attr_path(layer, path, _rows(get_attr_path(layer, path), neurons))  # type: ignore[arg-type]
            _set_attr_path(layer, spec.down, _cols(get_attr_path(layer, spec.down), neurons))  # type: ignore[arg-type]
            if heads.numel() == 0:
                attn_path = spec.q.rpartition(".")[0]
                attn = get_attr_path(layer, attn_path) if attn_path else layer
                assert isinstance(attn, nn.Module)
                owns_o = bool(attn_path) and spec.o.startswith(attn_path + ".")
                attn.__class__ = _no_heads_class(type(attn))
                attn.__dict__["_physical_o"] = get_attr_path(layer, spec.o) if owns_o else None
        kept = [layer for layer, k in zip(layers, keep_layers) if k]
        _set_attr_path(backbone, spec.layers, nn.ModuleList(kept))
    return model
