"""Training-free gates (``GateConfig(router="griffin")``): unit scores from a dense prefill.

GRIFFIN-style (Dong et al., 2024, "Prompt-prompted Adaptive Structured Pruning for Efficient
LLM Generation"): a sequence's prompt runs **dense**; while it does, :class:`ActivationRecorder`
reads, in every gated layer,

- the FFN's intermediate activation ``z`` (B, T, F) — the input of the down projection
  (SwiGLU: ``act(gate(h)) * up(h)``) — and
- the attention context ``c`` (B, T, n_q·d) — the input of the O projection,

normalises each token's vector to unit L2 norm (every prompt token weighs the same, as in
GRIFFIN) and sums squares over the prompt's non-padding tokens per unit: an FFN slice owns
``slice_size`` columns of ``z``, a head unit (a KV group under GQA) the ``G·d`` columns of its
query heads in ``c``. The *share* ``f_u = energy_u / tokens`` lies in [0, 1] and sums to 1 over
the units of one kind in one layer.

Allocation across layers and kinds: per layer and kind, units are ranked by share, and each
unit's *coverage before it*, ``c_u`` = the summed share of the units ranked above it, sets its
logit: ``log σ(logit_u) = log(cost_u / max cost) − SCALE · c_u``. The one greedy selection
(:func:`dynprune.gates.select_under_budget`, key ``log σ(logit) − log cost = −log(max cost) −
SCALE · c_u``) then takes units in order of ``c_u`` across all layers and both kinds: every layer
keeps its top units up to the same covered share of its activation energy — a layer whose energy
is concentrated needs few units, a flat one more, and no layer is starved (a global threshold on
raw shares would drop whole layers whose energy is spread evenly). GRIFFIN keeps the same top-k
share per layer (FFN only); this is its budgeted, per-layer-adaptive form.

What it costs: the prompt runs dense (its FLOPs are the dense model's), and the scoring is
elementwise work (one square-and-sum per activation, ~T·(F + n_q·d) adds per layer; not a
matmul, so not counted by the FLOPs module or FlopCounterMode). Only the tokens after the
prompt run under the chosen gates (docs/training_free.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dynprune.arch import LayerParts
from dynprune.gates import GateScores

Tensor = torch.Tensor

SCALE = 10.0  # logit spread per unit of covered share (any value keeps the order; 10 stays in fp32 range)


def unit_energy(x: Tensor, n_units: int, valid: Tensor | None) -> Tensor:
    """Per-sample activation energy of each unit: x (B, T, n_units·w), valid (B, T) bool -> (B, n_units).

    Each token's vector is scaled to unit L2 norm first, so a sample's energies sum to its
    number of valid tokens."""
    x = x.detach().float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sq = x.square().view(*x.shape[:-1], n_units, -1).sum(-1)  # (B, T, n_units)
    if valid is not None:
        sq = sq * valid[..., None].to(sq.dtype)
    return sq.sum(1)  # (B, n_units)


def coverage_logits(energy: Tensor, tokens: Tensor, cost: float, max_cost: float) -> Tensor:
    """energy (B, L, U), tokens (B,) -> logits (B, L, U) whose greedy order is the coverage before
    each unit (module docstring); ``cost``: FLOPs of one unit of this kind, ``max_cost``: of the
    costliest kind."""
    share = energy / tokens.clamp_min(1.0)[:, None, None]  # (B, L, U), sums to 1 per (sample, layer)
    ranked, order = share.sort(dim=-1, descending=True, stable=True)
    before = torch.empty_like(ranked).scatter_(-1, order, ranked.cumsum(-1) - ranked)
    log_p = math.log(cost / max_cost) - SCALE * before.double() - 1e-6  # log σ(logit) < 0
    return (log_p - torch.log(-torch.expm1(log_p))).float()  # logit = log p − log(1 − p)


class ActivationRecorder:
    """Records head-unit and FFN-slice energies of one dense forward (hooks on O and FFN-down)."""

    def __init__(self, parts: list[LayerParts], n_heads: int, n_slices: int) -> None:
        self.parts, self.n_heads, self.n_slices = parts, n_heads, n_slices
        self.head: list[Tensor | None] = [None] * len(parts)
        self.ffn: list[Tensor | None] = [None] * len(parts)
        self.valid: Tensor | None = None

    def _hook(self, store: list, index: int, n_units: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            store[index] = unit_energy(args[0], n_units, self.valid)

        return hook

    @contextmanager
    def recording(self, valid: Tensor | None) -> Iterator[ActivationRecorder]:
        """Hooks in place for the duration of one forward; ``valid`` (B, T) bool marks prompt tokens."""
        self.valid = valid
        handles = []
        for i, lp in enumerate(self.parts):
            handles.append(lp.o.register_forward_pre_hook(self._hook(self.head, i, self.n_heads)))
            handles.append(lp.down.register_forward_pre_hook(self._hook(self.ffn, i, self.n_slices)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def scores(
        self, heads: bool, ffn: bool, tokens: Tensor, head_cost: float, slice_cost: float
    ) -> GateScores:
        """Logits (B, L, U) of the recorded forward (``tokens`` (B,): valid prompt tokens per sample;
        unit costs at the prompt's length from the FLOPs module)."""
        max_cost = max(c for c, on in ((head_cost, heads), (slice_cost, ffn)) if on)

        def stack(store: list[Tensor | None], on: bool, cost: float) -> Tensor | None:
            if not on:
                return None
            if any(t is None for t in store):
                raise RuntimeError("the dense prefill did not run every gated layer: no activations recorded")
            energy = torch.stack(store, dim=1)  # type: ignore[arg-type]  # (B, L, U)
            return coverage_logits(energy, tokens.to(energy.device), cost, max_cost)

        return GateScores(stack(self.head, heads, head_cost), stack(self.ffn, ffn, slice_cost), None)
