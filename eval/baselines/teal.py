"""TEAL-style activation sparsity (Liu et al., 2024, "Training-Free Activation Sparsity in LLMs"):
a baseline for the training-free router, not part of dynprune's core.

Per token, every hidden activation that feeds a projection of a pre-LN decoder layer is zeroed
where its magnitude is below a threshold calibrated per layer and site on calibration text:

- ``attn_in``: the attention norm's output (input of Q, K, V),
- ``o_in``: the attention context (input of O),
- ``ffn_in``: the FFN norm's output (input of up and SwiGLU gate),
- ``down_in``: the FFN intermediate activation (input of down).

One sparsity level ``s`` for every site (TEAL's uniform allocation); the threshold of a site is
the ``s``-quantile of its |activation| on the calibration tokens (dense model). ``s`` is set so
that the FLOPs an ideal sparse kernel executes (a zero input skips its weight column) are the
budget's share of dense: ``1 - s · linear / dense`` = budget, where ``linear`` is the per-token
FLOPs of the layers' projections (attention's T² part and the LM head stay dense). The reported
FLOPs ratio uses the *measured* density of every site on the evaluated tokens. On dense hardware
the zeros save nothing: this is an accuracy baseline at an ideal FLOPs count.

Positions before ``start`` (a prompt) stay dense, like the training-free router's prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dynprune.arch import ModelParts
from dynprune.flops import FlopsModel

Tensor = torch.Tensor
SITES = ("attn_in", "o_in", "ffn_in", "down_in")
_SAMPLES_PER_CALL = 32768  # |activation| values kept per (layer, site) and forward for calibration


def site_flops(fm: FlopsModel) -> dict[str, float]:
    """Per-token projection FLOPs fed by each site, summed over layers (GQA: K/V narrower than Q)."""
    h, d, g, units = fm.hidden, fm.head_dim, fm.heads_per_unit, fm.n_heads
    q_width, kv_width = units * g * d, units * d
    per_layer = {
        "attn_in": 2.0 * h * (q_width + 2 * kv_width),
        "o_in": 2.0 * q_width * h,
        "ffn_in": 2.0 * h * fm.ffn_dim * (fm.ffn_matmuls - 1),
        "down_in": 2.0 * fm.ffn_dim * h,
    }
    return {k: v * fm.n_layers for k, v in per_layer.items()}


def sparsity_for_budget(fm: FlopsModel, budget: float, seq_len: int) -> float:
    """The uniform sparsity whose ideal FLOPs are ``budget`` of dense at ``seq_len`` (per token)."""
    linear = sum(site_flops(fm).values())
    dense_per_token = fm.dense(seq_len) / seq_len
    s = (1.0 - budget) * dense_per_token / linear
    if not 0.0 <= s < 1.0:
        raise ValueError(
            f"budget {budget} cannot be reached by activation sparsity alone (needs sparsity {s:.3f}; "
            f"the projections are {linear / dense_per_token:.1%} of dense FLOPs)"
        )
    return s


def flops_ratio(fm: FlopsModel, density: dict[str, float], seq_len: int) -> float:
    """Ideal FLOPs ratio of a run whose sites had these mean densities (fractions kept)."""
    dense_per_token = fm.dense(seq_len) / seq_len
    saved = sum((1.0 - density[k]) * f for k, f in site_flops(fm).items())
    return 1.0 - saved / dense_per_token


class ActivationSparsifier:
    """Hooks on a pre-LN decoder's layers: record |x| (calibration) or zero |x| < threshold."""

    def __init__(self, parts: ModelParts) -> None:
        if parts.spec.norm_position != "pre":
            raise ValueError(f"TEAL sparsity is implemented for pre-LN decoders, not {parts.spec.family}")
        self.parts = parts
        self.samples: dict[tuple[int, str], list[Tensor]] = {}
        self.thresholds: dict[tuple[int, str], float] | None = None
        self.kept: dict[str, float] = dict.fromkeys(SITES, 0.0)
        self.seen: dict[str, float] = dict.fromkeys(SITES, 0.0)
        self.start = 0
        self._generator = torch.Generator().manual_seed(0)

    def _apply(self, x: Tensor, layer: int, site: str) -> Tensor:
        tail = x[:, self.start :]  # (B, T - start, width)
        if self.thresholds is None:  # calibration: a random sample of |x|
            flat = tail.detach().abs().float().reshape(-1)
            idx = torch.randint(
                0, flat.numel(), (min(_SAMPLES_PER_CALL, flat.numel()),), generator=self._generator
            )
            self.samples.setdefault((layer, site), []).append(flat[idx.to(flat.device)])
            return x
        keep = tail.abs() >= self.thresholds[(layer, site)]
        self.kept[site] += float(keep.sum())
        self.seen[site] += float(keep.numel())
        out = x.clone()
        out[:, self.start :] = tail * keep
        return out

    def _output_hook(self, layer: int, site: str):
        def hook(module, args, output):
            return self._apply(output, layer, site)

        return hook

    def _input_hook(self, layer: int, site: str):
        def hook(module, args):
            return (self._apply(args[0], layer, site), *args[1:])

        return hook

    @contextmanager
    def active(self, start: int = 0) -> Iterator[ActivationSparsifier]:
        """Hooks in place (positions >= ``start`` only); calibrating until :meth:`calibrate`."""
        self.start = start
        handles = []
        for i, lp in enumerate(self.parts.parts):
            handles.append(lp.attn_norm.register_forward_hook(self._output_hook(i, "attn_in")))
            handles.append(lp.o.register_forward_pre_hook(self._input_hook(i, "o_in")))
            handles.append(lp.ffn_norm.register_forward_hook(self._output_hook(i, "ffn_in")))
            handles.append(lp.down.register_forward_pre_hook(self._input_hook(i, "down_in")))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def calibrate(self, sparsity: float) -> None:
        """Thresholds = the ``sparsity``-quantile of the recorded |x| per (layer, site)."""
        if not self.samples:
            raise RuntimeError("no calibration activations recorded: run forwards under active() first")
        self.thresholds = {
            key: float(torch.quantile(torch.cat(vals), sparsity)) for key, vals in self.samples.items()
        }
        self.kept, self.seen = dict.fromkeys(SITES, 0.0), dict.fromkeys(SITES, 0.0)

    def density(self) -> dict[str, float]:
        """Mean fraction of activations kept per site since :meth:`calibrate`."""
        return {k: self.kept[k] / self.seen[k] if self.seen[k] else 1.0 for k in SITES}
