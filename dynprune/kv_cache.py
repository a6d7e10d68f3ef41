"""The KV cache of a gated decoder: only kept units of kept layers are stored.

Policy (docs/architecture.md, "KV cache"): a sequence's head-unit and layer
gates are decided once, from its prompt, at prefill, and held for its whole
generation. The gathered plan of the prefill (blocks of rows × a run of KV
groups per layer) is therefore the plan of every decode step, and the cache of
gated layer ``l`` is one ``(K, V)`` pair per attention block, shaped
``(rows of the block, kept KV groups, T, head_dim)``: a skipped layer stores
nothing, a skipped KV group is never projected nor stored, and the cache's
size is exactly the kept share of the dense cache.

:class:`GatedKVCache` is an HF ``Cache`` (so ``generate`` and the HF model's
mask/position code work unchanged): its per-layer objects report the sequence
length HF expects; layers that run dense (``router_layer`` prefix layers) use
HF's ordinary ``DynamicLayer``. It also carries the held decision
(:attr:`GatedKVCache.decision`): the prefill's ForwardInfo and plans.
Beam search and cache cropping would need the per-block storage re-indexed:
they are refused with a clear error.

A training-free router (``GateConfig(router="griffin")``, dynprune/magnitude.py)
runs the prompt dense, through HF's own attention: a fresh :class:`BlockKV`
then takes the whole layer's K/V (``update``), and once the prompt's gates are
chosen :meth:`GatedKVCache.restrict` keeps only the kept rows × KV groups of
each attention block of the plan — from then on the layer is an ordinary
gathered-path cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from dynprune.plan import KindPlan
from dynprune.qkv_layout import units_of

Tensor = torch.Tensor


class BlockKV(DynamicLayer):
    """Cache of one gated layer: ``blocks[i]`` = (K, V) of attention block i, (r, k, T, d) each."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.blocks: dict[int, tuple[Tensor, Tensor]] = {}
        self.length = 0  # tokens seen (what HF's mask/position code asks for)
        self.is_initialized = True
        self.device = torch.device("cpu")
        self.written_by: str | None = None  # "dense" (HF's attention, before restrict) or "gathered"

    def _write(self, by: str) -> None:
        if self.written_by not in (None, by):
            raise RuntimeError(
                "a gated layer's cache is written by the gathered path, not by HF's attention "
                "(a dense prefill's K/V must be restricted to the chosen units first: GatedKVCache.restrict)"
            )
        self.written_by = by

    def append(self, index: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new tokens' K/V of block ``index``; returns the block's whole K/V."""
        self._write("gathered")
        old = self.blocks.get(index)
        if old is None:
            # own, contiguous storage (never a view that keeps the whole Q/K/V buffer alive)
            k, v = (t.clone(memory_format=torch.contiguous_format) for t in (k, v))
        else:
            k, v = torch.cat([old[0], k], dim=2), torch.cat([old[1], v], dim=2)
        self.blocks[index] = (k, v)
        self.device = k.device
        return k, v

    def advance(self, n_tokens: int) -> None:
        """Called once per forward by the gated layer, whether or not it stored anything."""
        self._write("gathered")
        self.length += n_tokens

    def restrict(self, plan: KindPlan) -> None:
        """Dense K/V (B, n_kv, T, d) written by HF's attention -> one (K, V) per attention block of
        ``plan``: its rows (plan order) × its units; nothing for a layer the plan skips."""
        if self.written_by != "dense" or self.keys is None or self.values is None:
            raise RuntimeError("restrict needs the K/V of a dense prefill (and only once)")
        keys, values = self.keys, self.values
        for index, blk in enumerate(plan.blocks):
            rows = torch.as_tensor(plan.rows[blk.start : blk.stop], dtype=torch.long, device=keys.device)
            k, v = (units_of(t.index_select(0, rows), blk.units, 1) for t in (keys, values))  # (r, k, T, d)
            self.blocks[index] = (k.contiguous(), v.contiguous())
        self.keys = self.values = None
        self.written_by = "gathered"

    @property
    def past(self) -> int:
        return self.length

    def nbytes(self) -> int:
        dense = [t for t in (self.keys, self.values) if t is not None]
        return sum(t.numel() * t.element_size() for kv in (*self.blocks.values(), dense) for t in kv)

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
        """HF's attention writing the whole layer's K/V (B, n_kv, T, d): a dense forward on a fresh or
        dense-written cache only (a training-free prefill, or budget 1.0)."""
        self._write("dense")
        if self.keys is None or self.values is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.length += key_states.shape[-2]
        self.device = key_states.device
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.blocks, self.length, self.written_by = {}, 0, None
        self.keys = self.values = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError(_NO_REINDEX)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(_NO_REINDEX)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError(_NO_REINDEX)

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError(_NO_REINDEX)


_NO_REINDEX = (
    "the gated KV cache stores each attention block's rows and KV groups separately and cannot be "
    "re-indexed: beam search, contrastive search, assisted decoding and cache cropping are not supported "
    "with budget < 1 (use greedy or sampling; num_beams=1)"
)


@dataclass
class HeldDecision:
    """What the prefill decided, reused by every later step of the same generation."""

    info: Any  # dynprune.state.ForwardInfo of the prefill
    plans: list | None  # dynprune.plan.LayerPlan per gated layer (torch backend)
    batch: int


class GatedKVCache(Cache):
    """HF Cache for a gated decoder: dense HF layers for the first ``n_dense`` layers, then
    :class:`BlockKV` per gated layer. ``decision`` is set at prefill (see module docstring)."""

    def __init__(self, n_layers: int, n_dense: int = 0) -> None:
        super().__init__(layers=[DynamicLayer() if i < n_dense else BlockKV() for i in range(n_layers)])
        self.n_dense = n_dense
        self.decision: HeldDecision | None = None

    def hold(self, info: Any, plans: list | None, batch: int) -> None:
        """Keep the prefill's decision for the later steps of this generation."""
        self.decision = HeldDecision(info, plans, batch)

    def restrict(self, plans: list) -> None:
        """After a dense prefill: keep only the K/V of the units each layer's plan keeps
        (``plans``: one dynprune.plan.LayerPlan per gated layer)."""
        for index, plan in enumerate(plans):
            self.gated_layer(index).restrict(plan.attention)

    def gated_layer(self, index: int) -> BlockKV:
        layer = self.layers[self.n_dense + index]
        assert isinstance(layer, BlockKV)
        return layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if self.layers else 0

    def nbytes(self) -> int:
        """Bytes of cached K/V (all layers)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, BlockKV):
                total += layer.nbytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

    def reset(self) -> None:
        super().reset()
        self.decision = None

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError(_NO_REINDEX)


def dense_kv_bytes(
    n_layers: int, batch: int, n_kv_heads: int, seq: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes HF's DynamicCache holds for the same tokens (K and V of every layer and KV head)."""
    return 2 * n_layers * batch * n_kv_heads * seq * head_dim * torch.empty(0, dtype=dtype).element_size()
