"""Hugging Face classes for structurally pruned encoders (per-layer head counts and FFN widths).

Self-contained (torch + transformers only): :func:`dynprune.eval.export.export_static`
copies this file into an exported model directory as ``modeling_dynprune_pruned.py`` and
points ``auto_map`` at it, so the export loads with plain Hugging Face, no dynprune needed::

    AutoModelForSequenceClassification.from_pretrained(export_dir, trust_remote_code=True)

The config keeps the original sizes (so the head size stays ``hidden / num_attention_heads``)
plus ``dynprune_pruning = {"heads_per_layer": [...], "ffn_per_layer": [...], "paths": {...}}``
for the kept layers (``num_hidden_layers`` / ``n_layers`` already counts only those). ``paths``
are the module paths of :data:`dynprune.arch.ARCH_TABLE` (written at export, so this file keeps
no architecture table of its own): ``layers`` relative to ``model.base_model``, the projections
relative to a layer. Each class builds the stock model, then replaces its Q/K/V/O and FFN
projections by smaller ones; a layer with no head left runs no attention (its attention block
adds only the output bias).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers import (
    BertForSequenceClassification,
    DistilBertForSequenceClassification,
    RobertaForSequenceClassification,
)

#: keys of ``dynprune_pruning["paths"]`` (see the module docstring)
PATH_KEYS = ("layers", "q", "k", "v", "o", "up", "down")


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: Any, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, value)


class _NoHeadsMixin:
    """Mixed into a self-attention module left with zero heads: returns a zero-width context
    (or, where the module owns the output projection, that projection's bias)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (B, T, 0)
        proj = self.__dict__.get("_pruned_out_proj")
        return (out if proj is None else proj(out)), None


def _no_heads(module: nn.Module, out_proj: nn.Module | None) -> None:
    module.__class__ = type(f"NoHeads{type(module).__name__}", (_NoHeadsMixin, type(module)), {})
    module.__dict__["_pruned_out_proj"] = out_proj  # not a new submodule: state-dict keys unchanged


def shrink(
    model: nn.Module, paths: dict[str, str], heads_per_layer: list[int], ffn_per_layer: list[int]
) -> nn.Module:
    """Give every layer of a stock model the pruned widths (weights are loaded afterwards)."""
    missing = [k for k in PATH_KEYS if k not in paths]
    if missing:
        raise ValueError(f"dynprune_pruning.paths lacks {missing}: re-export the model")
    config = model.config
    n_heads = getattr(config, "num_attention_heads", None) or config.n_heads
    hidden = getattr(config, "hidden_size", None) or config.dim
    head_dim = hidden // n_heads
    layers = _get(model.base_model, paths["layers"])
    if len(layers) != len(heads_per_layer) or len(layers) != len(ffn_per_layer):
        raise ValueError(
            f"{len(layers)} layers but {len(heads_per_layer)} head and {len(ffn_per_layer)} FFN widths"
        )
    with warnings.catch_warnings():  # zero-width projections (no head / no neuron left) are fine
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        for layer, heads, width in zip(layers, heads_per_layer, ffn_per_layer):
            _shrink_layer(layer, heads * head_dim, width, hidden, paths)
    return model


def _shrink_layer(layer: nn.Module, inner: int, width: int, hidden: int, paths: dict[str, str]) -> None:
    for key in ("q", "k", "v"):
        _set(layer, paths[key], nn.Linear(hidden, inner))
    _set(layer, paths["o"], nn.Linear(inner, hidden))
    _set(layer, paths["up"], nn.Linear(hidden, width))
    _set(layer, paths["down"], nn.Linear(width, hidden))
    if inner == 0:
        attn = paths["q"].rpartition(".")[0]  # the self-attention module owns Q
        owns_out = paths["o"].startswith(attn + ".")
        _no_heads(_get(layer, attn), _get(layer, paths["o"]) if owns_out else None)


def _init_pruned(self: nn.Module) -> None:
    info = self.config.dynprune_pruning
    shrink(self, dict(info["paths"]), list(info["heads_per_layer"]), list(info["ffn_per_layer"]))


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _init_pruned(self)


class PrunedRobertaForSequenceClassification(RobertaForSequenceClassification):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _init_pruned(self)


class PrunedDistilBertForSequenceClassification(DistilBertForSequenceClassification):
    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _init_pruned(self)


CLASSES = {
    "bert": PrunedBertForSequenceClassification,
    "roberta": PrunedRobertaForSequenceClassification,
    "distilbert": PrunedDistilBertForSequenceClassification,
}
