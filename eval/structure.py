"""Static sub-networks: which heads, FFN neurons and layers a statically pruned model keeps.

A :class:`Structure` names kept units by their index in the *original*
(unwrapped) model, per layer; a removed layer is the identity (like a skipped
layer of the gated model). Its FLOPs use the one FLOPs module's formulas
(:mod:`dynprune.flops`: ``head_cost``, ``slice_cost`` per neuron, ``task_head``),
so static methods, physically pruned models and dynamic gates are counted the
same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynprune.arch import resolve
from dynprune.flops import FlopsModel, build_flops_model

Tensor = torch.Tensor


@dataclass(frozen=True)
class Structure:
    """Kept original head / neuron indices per layer (sorted) and which layers run."""

    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]
    layers: tuple[bool, ...]

    def __post_init__(self) -> None:
        if not (len(self.heads) == len(self.neurons) == len(self.layers)):
            raise ValueError(
                f"Structure: {len(self.heads)} head lists, {len(self.neurons)} neuron lists, "
                f"{len(self.layers)} layer flags: one of each per layer"
            )

    # -- construction ------------------------------------------------------------------
    @classmethod
    def full(cls, n_layers: int, n_heads: int, ffn_dim: int) -> Structure:
        return cls(
            heads=tuple(tuple(range(n_heads)) for _ in range(n_layers)),
            neurons=tuple(tuple(range(ffn_dim)) for _ in range(n_layers)),
            layers=(True,) * n_layers,
        )

    @classmethod
    def from_indices(
        cls, heads: list[Any], neurons: list[Any], layers: list[bool] | None = None
    ) -> Structure:
        """From per-layer index collections (tensors or lists); a layer with no head and no
        neuron left is removed (identity) unless ``layers`` says otherwise."""
        hs = tuple(tuple(sorted(int(i) for i in h)) for h in heads)
        ns = tuple(tuple(sorted(int(i) for i in n)) for n in neurons)
        if layers is None:
            layers = [bool(h or n) for h, n in zip(hs, ns)]
        keep = tuple(bool(x) for x in layers)
        # units of a removed layer are not kept
        hs = tuple(h if k else () for h, k in zip(hs, keep))
        ns = tuple(n if k else () for n, k in zip(ns, keep))
        return cls(hs, ns, keep)

    # -- sizes -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def head_counts(self) -> list[int]:
        return [len(h) if k else 0 for h, k in zip(self.heads, self.layers)]

    def neuron_counts(self) -> list[int]:
        return [len(n) if k else 0 for n, k in zip(self.neurons, self.layers)]

    def layer_flops(self, fm: FlopsModel, seq_len: int) -> list[float]:
        """FLOPs of each *kept* layer for one sample of padded length ``seq_len`` (dynprune.flops
        formulas; a removed layer is absent from the list, as it is from the pruned model)."""
        neuron = fm.slice_cost(seq_len) / fm.slice_size
        return [
            h * fm.head_cost(seq_len) + n * neuron
            for h, n, k in zip(self.head_counts(), self.neuron_counts(), self.layers)
            if k
        ]

    def flops(self, fm: FlopsModel, seq_len: int) -> float:
        """FLOPs of one sample of padded length ``seq_len`` (same formulas as dynprune.flops)."""
        return float(sum(self.layer_flops(fm, seq_len)) + fm.task_head(seq_len))

    def flops_ratio(self, fm: FlopsModel, seq_len: int) -> float:
        return self.flops(fm, seq_len) / fm.dense(seq_len)

    def is_uniform(self) -> bool:
        """Every kept layer keeps the same number of heads and of neurons."""
        kept = [(len(h), len(n)) for h, n, k in zip(self.heads, self.neurons, self.layers) if k]
        return len(set(kept)) <= 1

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"heads": [list(h) for h in self.heads], "neurons": [list(n) for n in self.neurons],
                "layers": list(self.layers)}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Structure:
        return cls.from_indices(data["heads"], data["neurons"], data["layers"])

    def summary(self) -> str:
        """Short human-readable form: heads/neurons per layer, '-' for a removed layer."""
        return " ".join(
            f"{h}h/{n}f" if k else "-"
            for h, n, k in zip(self.head_counts(), self.neuron_counts(), self.layers)
        )

    def key(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def static_flops_model(model: nn.Module) -> FlopsModel:
    """The FLOPs model of an unpruned HF model, counting FFN cost per neuron (slice size 1)."""
    return build_flops_model(model, resolve(model), slice_size=1)
