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
the units of one kind in one layer. The logits are ``logit(f_u) = log f_u − log(1 − f_u)``, so
the one greedy selection (:func:`dynprune.gates.select_under_budget`, key
``log σ(logit) − log cost = log f_u − log cost``) keeps units by activation share per FLOP
until the budget is spent — the same selection, FLOPs module and plan as every router.

What it costs: the prompt runs dense (its FLOPs are the dense model's), and the scoring is
elementwise work (one square-and-sum per activation, ~T·(F + n_q·d) adds per layer; not a
matmul, so not counted by the FLOPs module or FlopCounterMode). Only the tokens after the
prompt run under the chosen gates (docs/training_free.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dynprune.arch import LayerParts
from dynprune.gates import GateScores

Tensor = torch.Tensor

_EPS = 1e-6  # shares are clamped to [_EPS, 1 - _EPS] before the logit (a silent unit still sorts last)


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


def share_logits(energy: Tensor, tokens: Tensor) -> Tensor:
    """energy (B, L, U), tokens (B,) -> logit of each unit's share of its layer's energy."""
    share = (energy / tokens.clamp_min(1.0)[:, None, None]).clamp(_EPS, 1 - _EPS)
    return torch.log(share) - torch.log1p(-share)


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

    def scores(self, heads: bool, ffn: bool, tokens: Tensor) -> GateScores:
        """Logits (B, L, U) of the recorded forward (``tokens`` (B,): valid prompt tokens per sample)."""

        def stack(store: list[Tensor | None], on: bool) -> Tensor | None:
            if not on:
                return None
            if any(t is None for t in store):
                raise RuntimeError("the dense prefill did not run every gated layer: no activations recorded")
            return share_logits(torch.stack(store, dim=1), tokens.to(store[0].device))  # type: ignore[arg-type]

        return GateScores(stack(self.head, heads), stack(self.ffn, ffn), None)
