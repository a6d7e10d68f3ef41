"""Data-driven unit importance (first-order Taylor) -> the order in which units are kept.

Nested gates keep a prefix of each layer's heads and FFN neurons, so the order
matters. The importance of a unit is the expected magnitude of the loss change
when its output is scaled: for a head, |sum over tokens and head dims of
x * dL/dx| at the input of the attention output projection; for a neuron, the
same at the input of the FFN down projection (x = activation). Summed over
samples of the training data, on the fine-tuned dense model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from dynprune.train.data import Collator, epoch_batches, model_inputs

from dynprune.arch import resolve
from dynprune.ordering import orders_from_scores


def taylor_orders(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collate: Collator,
    *,
    n_batches: int,
    batch_size: int,
    router_layer: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head_perm (L, n_heads), ffn_perm (L, ffn_dim)) for the gated layers (from ``router_layer``),
    most important first, to pass to ``dynprune.wrap(..., orders=...)``. ``model``: a plain HF model."""
    parts = resolve(model)
    gated = parts.parts[router_layer:]
    n_heads = parts.n_heads
    head_imp = torch.zeros(len(gated), n_heads, dtype=torch.float64)
    ffn_imp = torch.zeros(len(gated), parts.ffn_dim, dtype=torch.float64)
    handles = []

    def capture(store: torch.Tensor, layer: int, heads: bool):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if not x.requires_grad:
                return

            def on_grad(grad: torch.Tensor) -> None:
                contrib = (x.detach() * grad).double()  # (B, T, width)
                if heads:
                    contrib = contrib.view(*contrib.shape[:-1], n_heads, -1).sum(-1)  # (B, T, n_heads)
                store[layer] += contrib.sum(1).abs().sum(0)

            x.register_hook(on_grad)

        return pre_hook

    for i, lp in enumerate(gated):
        handles.append(lp.o.register_forward_pre_hook(capture(head_imp, i, heads=True)))
        handles.append(lp.down.register_forward_pre_hook(capture(ffn_imp, i, heads=False)))
    was_training = model.training
    model.eval()  # no dropout: importance of the model as it is
    device = next(model.parameters()).device
    try:
        lengths = [len(e["input_ids"]) for e in examples]
        batches = epoch_batches(lengths, min(batch_size, len(examples)), seed=seed, epoch=0)[:n_batches]
        for idx in batches:
            batch = collate([examples[i] for i in idx])
            out = model(**{k: v.to(device) for k, v in model_inputs(batch).items()})
            F.cross_entropy(out.logits.float(), batch["labels"].to(device)).backward()
            model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return orders_from_scores(list(head_imp), list(ffn_imp))
