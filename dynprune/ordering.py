"""Importance order of heads and FFN neurons: permute weights so kept sets are prefixes.

Nested gates keep a *prefix* of each layer's units. Permuting the heads (Q/K/V
rows and O columns, in head blocks) and the FFN neurons (up/gate rows and
down columns) of a layer changes nothing in the layer's function, and puts
the most important units first, so a kept set's weights are a view.

``head_perm[l][j]`` / ``ffn_perm[l][j]`` = original index of the unit now at
position j. Permutations move values only, so undoing them is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dynprune.arch import LayerParts

Tensor = torch.Tensor


def weight_norm_head_scores(parts: LayerParts, n_heads: int) -> Tensor:
    """Data-free head-unit importance: ||V rows of the unit|| × ||O columns of the unit||. (n_heads,)

    ``n_heads`` counts head units (KV groups under GQA: the group's V head and the O columns of
    its query heads)."""
    v = parts.v.weight.detach().float().reshape(n_heads, -1).norm(dim=1)  # (units,)
    o = parts.o.weight.detach().float()  # (H, units * G * d)
    o = o.reshape(o.shape[0], n_heads, -1).transpose(0, 1).flatten(1).norm(dim=1)
    return v * o


def weight_norm_neuron_scores(parts: LayerParts) -> Tensor:
    """Data-free FFN neuron importance: ||up row|| × ||down column||. (ffn_dim,)"""
    up = parts.up.weight.detach().float().norm(dim=1)
    down = parts.down.weight.detach().float().norm(dim=0)
    return up * down


def _take(param: nn.Parameter | Tensor | None, index: Tensor, dim: int) -> None:
    """param[...] = param.index_select(dim, index), in place (``param`` may be a view)."""
    if param is not None:
        with torch.no_grad():
            param.copy_(param.index_select(dim, index.to(param.device)))


def _unit_rows(perm: Tensor, width: int) -> Tensor:
    """Unit permutation -> row permutation for units of ``width`` rows: (units*width,)."""
    return (perm[:, None] * width + torch.arange(width)).reshape(-1)


def permute_heads(parts: LayerParts, perm: Tensor, n_heads: int) -> None:
    """Reorder head units in place: new unit j = old unit perm[j] (a KV group moves whole:
    its G query heads' Q rows and O columns, its K and V rows)."""
    for lin in (parts.q, parts.k, parts.v):
        rows = _unit_rows(perm, lin.out_features // n_heads)
        _take(lin.weight, rows, 0)
        _take(lin.bias, rows, 0)
    _take(parts.o.weight, _unit_rows(perm, parts.o.in_features // n_heads), 1)


def permute_neurons(parts: LayerParts, perm: Tensor) -> None:
    """Reorder FFN neurons in place: new neuron j = old neuron perm[j]."""
    for lin in (parts.up, parts.gate_proj):
        if lin is not None:
            _take(lin.weight, perm, 0)
            _take(lin.bias, perm, 0)
    _take(parts.down.weight, perm, 1)


def inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def apply_orders(parts: Sequence[LayerParts], head_perm: Tensor, ffn_perm: Tensor, n_heads: int) -> None:
    for p, hp, fp in zip(parts, head_perm, ffn_perm):
        permute_heads(p, hp.cpu(), n_heads)
        permute_neurons(p, fp.cpu())


def undo_orders(parts: Sequence[LayerParts], head_perm: Tensor, ffn_perm: Tensor, n_heads: int) -> None:
    for p, hp, fp in zip(parts, head_perm, ffn_perm):
        permute_heads(p, inverse(hp.cpu()), n_heads)
        permute_neurons(p, inverse(fp.cpu()))


def orders_from_scores(
    head_scores: Sequence[Tensor], neuron_scores: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Descending-importance permutations (stable) -> (L, n_heads), (L, ffn_dim)."""
    hp = torch.stack([torch.argsort(s, descending=True, stable=True) for s in head_scores])
    fp = torch.stack([torch.argsort(s, descending=True, stable=True) for s in neuron_scores])
    return hp, fp


def weight_norm_orders(parts: Sequence[LayerParts], n_heads: int) -> tuple[Tensor, Tensor]:
    return orders_from_scores(
        [weight_norm_head_scores(p, n_heads) for p in parts], [weight_norm_neuron_scores(p) for p in parts]
    )


def identity_orders(n_layers: int, n_heads: int, ffn_dim: int) -> tuple[Tensor, Tensor]:
    return (
        torch.arange(n_heads).repeat(n_layers, 1),
        torch.arange(ffn_dim).repeat(n_layers, 1),
    )
