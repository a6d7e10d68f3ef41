"""The one FLOPs module: dense, exact (hard gates) and expected (soft gates).

Conventions (match ``torch.utils.flop_counter.FlopCounterMode``):
- a matmul of (M, K) @ (K, N) costs 2·M·K·N; bias adds, norms, softmax and
  activations cost nothing (FlopCounterMode does not count them);
- attention of one head over T positions costs 2·T²·d for scores and
  2·T²·d for values;
- costs are per sample at the batch's *padded* length T: that is what runs.
  Padding costs FLOPs, so batches are padded dynamically (to their longest
  member) everywhere in dynprune.

Per sample and gated layer, one attention head unit costs
``4·T·H·d·(G + 1) + 4·T²·d·G`` — Q and O projections of its G query heads, its
K and V projections, and attention of G heads (G = 1 for MHA:
``8·T·H·d + 4·T²·d``; under GQA the unit is a whole KV group, see
dynprune/arch.py) — and one FFN slice of ``s`` columns costs ``4·T·H·s`` (up +
down; ``6·T·H·s`` with a SwiGLU gate). Causal attention is counted at the full
``T²`` (as FlopCounterMode counts SDPA with ``is_causal``). Layers the router
reads from (``router_layer``) run dense; the router and the task head
(pooler/classifier, or a decoder's LM head: a fixed cost per token) are fixed
costs. Matmuls of GPT-2's ``Conv1D`` projections are counted like nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynprune.arch import ModelParts

_POOLED_HEAD_SUFFIXES = ("ForSequenceClassification", "ForMultipleChoice", "ForNextSentencePrediction")


@dataclass(frozen=True)
class FlopsModel:
    """Closed-form FLOPs of a (gated) model; every FLOPs number in dynprune comes from here."""

    n_layers: int
    dense_prefix_layers: int
    n_heads: int
    head_dim: int
    hidden: int
    ffn_dim: int
    slice_size: int
    ffn_matmuls: int  # 2 (up, down) or 3 (gate, up, down)
    task_per_token: int  # FLOPs of task-head matmuls applied to every token
    task_pooled: int  # FLOPs of task-head matmuls applied once per sample
    router: int = 0  # per sample, when the router runs
    heads_per_unit: int = 1  # query heads per head unit (GQA group size G)

    @property
    def n_slices(self) -> int:
        return self.ffn_dim // self.slice_size

    @property
    def n_gated_layers(self) -> int:
        return self.n_layers - self.dense_prefix_layers

    def head_cost(self, seq_len: int) -> float:
        t, h, d, g = seq_len, self.hidden, self.head_dim, self.heads_per_unit
        return 4.0 * t * h * d * (g + 1) + 4.0 * t * t * d * g

    def slice_cost(self, seq_len: int) -> float:
        return float(self.ffn_matmuls) * 2.0 * seq_len * self.hidden * self.slice_size

    def layer_cost(self, seq_len: int) -> float:
        return self.n_heads * self.head_cost(seq_len) + self.n_slices * self.slice_cost(seq_len)

    def task_head(self, seq_len: int) -> float:
        return float(self.task_per_token * seq_len + self.task_pooled)

    def dense(self, seq_len: int) -> float:
        """FLOPs of one sample through the unwrapped model."""
        return self.n_layers * self.layer_cost(seq_len) + self.task_head(seq_len)

    def fixed(self, seq_len: int, with_router: bool = True) -> float:
        """FLOPs a gated sample always spends: dense prefix layers, task head, router."""
        cost = self.dense_prefix_layers * self.layer_cost(seq_len) + self.task_head(seq_len)
        return cost + (self.router if with_router else 0.0)

    def gated_units(
        self,
        head: torch.Tensor,
        ffn: torch.Tensor,
        layer: torch.Tensor,
        seq_len: int,
    ) -> torch.Tensor:
        """FLOPs of the gated layers per sample: (B,) from gate values.

        head (B, L, n_heads), ffn (B, L, n_slices), layer (B, L): keep values
        (0/1 for exact FLOPs, probabilities for expected FLOPs).
        """
        per_layer = head.sum(-1) * self.head_cost(seq_len) + ffn.sum(-1) * self.slice_cost(seq_len)
        return (layer * per_layer).sum(-1)

    def with_router(self, router_flops: int) -> FlopsModel:
        return FlopsModel(**{**self.__dict__, "router": int(router_flops)})


def linear_flops(module: nn.Module) -> int:
    """FLOPs of one pass of every nn.Linear in ``module`` over one row."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _task_head_flops(model: nn.Module, parts: ModelParts) -> tuple[int, int]:
    """(per-token, pooled) FLOPs of Linear layers outside the embeddings and layers."""
    inside = {id(m) for m in parts.layers.modules()} | {id(m) for m in parts.embeddings.modules()}
    pooled_model = type(model).__name__.endswith(_POOLED_HEAD_SUFFIXES)
    per_token = pooled = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in inside:
            continue
        cost = 2 * module.in_features * module.out_features
        if pooled_model or name.split(".")[-2:-1] == ["pooler"] or name.endswith("pooler.dense"):
            pooled += cost
        else:
            per_token += cost
    return per_token, pooled


def build_flops_model(
    model: nn.Module, parts: ModelParts, slice_size: int, dense_prefix_layers: int = 0
) -> FlopsModel:
    per_token, pooled = _task_head_flops(model, parts)
    return FlopsModel(
        n_layers=parts.n_layers,
        dense_prefix_layers=dense_prefix_layers,
        n_heads=parts.n_heads,
        head_dim=parts.head_dim,
        hidden=parts.hidden,
        ffn_dim=parts.ffn_dim,
        slice_size=slice_size,
        ffn_matmuls=3 if parts.spec.gate_proj else 2,
        task_per_token=per_token,
        task_pooled=pooled,
        heads_per_unit=parts.heads_per_unit,
    )
