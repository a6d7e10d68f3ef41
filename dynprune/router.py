"""Routers: from the input (and the budget) to one logit per gated unit.

One router plans every gate of a sample before the gated layers run (see
docs/architecture.md for why): it mean-pools the hidden states it reads
(embeddings output, or the output of the first ``router_layer`` dense layers)
over non-padding tokens, and maps them with a small MLP to logits for every
head, FFN slice and layer. Budget-conditioned routers also read the budget
(as ``[b, log b]``), so one router serves any budget.

Kinds: ``dynamic`` (input-adaptive), ``static`` (reads only the budget: one
learned mask per budget, the CoFi-like control), ``random`` (random logits:
the sanity control), ``griffin`` (training-free: no parameters; its logits come
from the prompt's own activation magnitudes after a dense prefill,
:mod:`dynprune.magnitude`, so this module is never called for it).
"""

from __future__ import annotations

import torch
from torch import nn

from dynprune.config import GateConfig
from dynprune.gates import GateScores, nested_logits


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of each sequence's real tokens: (B, T, H), (B, T) or None -> (B, H)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Router(nn.Module):
    """Maps pooled hidden states (+ budget) to :class:`GateScores`.

    Every learned router has the same hidden layer ``budget_inp`` of the budget
    features (a learned constant when not budget-conditioned); the dynamic one adds
    an input term ``inp(norm(pooled))`` to it. So the static router *is* the dynamic
    one with its input path removed, and the two train along one code path.
    """

    def __init__(self, hidden: int, n_layers: int, n_heads: int, n_slices: int, cfg: GateConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_layers, self.n_heads, self.n_slices = n_layers, n_heads, n_slices
        self.sizes = {
            "head": n_layers * n_heads if cfg.heads else 0,
            "ffn": n_layers * n_slices if cfg.ffn else 0,
            "layer": n_layers if cfg.layers else 0,
        }
        n_out = sum(self.sizes.values())
        n_budget = 2 if cfg.budget_conditioned else 0
        r = cfg.router_hidden
        self.norm: nn.LayerNorm | None = None
        self.inp: nn.Linear | None = None
        self.budget_inp: nn.Linear | None = None
        self.out: nn.Linear | None = None
        if cfg.router not in ("random", "griffin"):
            self.budget_inp = nn.Linear(max(n_budget, 1), r)  # (B, 2) budget features (or a 1) -> (B, r)
            self.out = nn.Linear(r + n_budget, n_out)
            nn.init.normal_(self.out.weight, std=0.02)
            nn.init.zeros_(self.out.bias)
        if cfg.router == "dynamic":
            self.norm = nn.LayerNorm(hidden)
            self.inp = nn.Linear(hidden, r, bias=False)  # (B, H) pooled input -> (B, r), added to budget_inp
        self.act = nn.GELU()
        self._generator: torch.Generator | None = None

    def flops_per_sample(self) -> int:
        """Matmul FLOPs of one forward for one sample (counted by the FLOPs module)."""
        total = 0
        for lin in (self.inp, self.budget_inp, self.out):
            if lin is not None:
                total += 2 * lin.in_features * lin.out_features
        return total

    def _budget_features(self, budget: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        b = budget.to(dtype)[:, None]  # (B, 1)
        return torch.cat([b, torch.log(b)], dim=-1)  # (B, 2)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, budget: torch.Tensor
    ) -> GateScores:
        """hidden (B, T, H), attention_mask (B, T) or None, budget (B,) -> logits."""
        batch = hidden.shape[0]
        if self.cfg.router == "griffin":
            raise RuntimeError(
                "the griffin router scores units from a dense prefill's activations (dynprune.magnitude), "
                "not from the router input; GatedModel routes it after the prefill"
            )
        if self.cfg.router == "random":
            if self._generator is None or self._generator.device != hidden.device:
                self._generator = torch.Generator(device=hidden.device).manual_seed(0)
            flat = torch.randn(
                batch, sum(self.sizes.values()), generator=self._generator, device=hidden.device
            )
            return self._split(flat.to(hidden.dtype), raw=False)
        assert self.budget_inp is not None and self.out is not None
        feats = self._budget_features(budget, hidden.dtype) if self.cfg.budget_conditioned else None
        z = self.budget_inp(feats if feats is not None else hidden.new_ones(batch, 1))  # (B, r)
        if self.inp is not None:
            assert self.norm is not None
            z = z + self.inp(self.norm(masked_mean(hidden, attention_mask)))
        z = self.act(z)
        if feats is not None:
            z = torch.cat([z, feats], dim=-1)  # (B, r + 2)
        return self._split(self.out(z), raw=True)

    def _split(self, flat: torch.Tensor, raw: bool) -> GateScores:
        """(B, n_out) -> GateScores; raw outputs become (nested) logits."""
        batch, cfg = flat.shape[0], self.cfg
        parts, offset = {}, 0
        for kind, size in self.sizes.items():
            parts[kind] = flat[:, offset : offset + size] if size else None
            offset += size
        head = ffn = layer = None
        if parts["head"] is not None:
            head = parts["head"].reshape(batch, self.n_layers, self.n_heads)
        if parts["ffn"] is not None:
            ffn = parts["ffn"].reshape(batch, self.n_layers, self.n_slices)
        if parts["layer"] is not None:
            layer = parts["layer"] + (cfg.init_keep_logit if raw else 0.0)
        if raw:
            if cfg.nested:
                head = None if head is None else nested_logits(head, cfg.init_keep_logit)
                ffn = None if ffn is None else nested_logits(ffn, cfg.init_keep_logit)
            else:
                head = None if head is None else head + cfg.init_keep_logit
                ffn = None if ffn is None else ffn + cfg.init_keep_logit
        elif cfg.nested:
            # random logits, sorted so that nested kinds keep prefixes
            head = None if head is None else head.sort(dim=-1, descending=True).values
            ffn = None if ffn is None else ffn.sort(dim=-1, descending=True).values
        return GateScores(head, ffn, layer)
