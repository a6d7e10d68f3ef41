"""Layer removal by block influence (ShortGPT; Men et al., 2024): a static baseline for decoders.

Block influence of layer ``l`` on calibration text: ``BI_l = 1 − E_tokens cos(h_l, h_{l+1})``
(hidden states before and after the layer, dense model). Layers with the lowest BI are removed,
one at a time, until the FLOPs of what is left (dynprune's FLOPs module: the LM head and
embeddings stay) fit the budget. Removal runs through the gated model as a fixed layer mask
(skipped layers pass their input through), so the executed FLOPs are the FLOPs module's.
"""

from __future__ import annotations

import itertools

import torch

from dynprune.flops import FlopsModel

Tensor = torch.Tensor


@torch.no_grad()
def block_influence(model: torch.nn.Module, chunks: Tensor, batch_size: int = 4) -> Tensor:
    """(n_layers,) mean over calibration tokens of 1 − cos(layer input, layer output)."""
    total, count = None, 0
    for start in range(0, chunks.shape[0], batch_size):
        ids = chunks[start : start + batch_size]
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states  # n_layers + 1 of (B, T, H)
        # HF's last entry is after the final norm, so the last layer's cosine includes the norm's
        # per-channel weight (it scores as influential; ShortGPT keeps the last layer in practice too)
        cos = torch.stack(
            [torch.nn.functional.cosine_similarity(a, b, dim=-1) for a, b in itertools.pairwise(hs)]
        )  # (L, B, T)
        part = (1.0 - cos).sum(dim=(1, 2)).double()
        total = part if total is None else total + part
        count += ids.numel()
    assert total is not None
    return total / count


def layers_to_keep(influence: Tensor, fm: FlopsModel, budget: float, seq_len: int) -> Tensor:
    """(n_layers,) bool: drop the lowest-influence layers until FLOPs <= budget · dense."""
    keep = torch.ones(influence.shape[0], dtype=torch.bool)
    limit = budget * fm.dense(seq_len)
    for layer in torch.argsort(influence, stable=True).tolist():
        if fm.task_head(seq_len) + int(keep.sum()) * fm.layer_cost(seq_len) <= limit * (1 + 1e-12):
            break
        keep[layer] = False
    return keep
