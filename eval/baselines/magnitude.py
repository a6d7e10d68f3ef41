"""Unstructured magnitude pruning: global L1 over the transformer layers' weights.

``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured`` zeroes the
smallest-magnitude weights across every Q/K/V/O and FFN up/down matrix of all
layers together (embeddings, pooler and classifier stay dense). During
fine-tuning the masks stay attached (pruned weights get no update); then
:func:`make_permanent` removes the reparametrisation so the zeros are plain
weight values.

The pruned model is still a dense model: on dense hardware it executes the
dense FLOPs and takes the dense time. ``nonzero_flops_ratio`` says what an
ideal sparse kernel could save (the point structured pruning is about).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from dynprune.arch import resolve
from dynprune.flops import FlopsModel


def prunable_linears(model: nn.Module) -> list[nn.Linear]:
    """Every attention and FFN projection of every layer (the weights magnitude pruning touches)."""
    out: list[nn.Linear] = []
    for p in resolve(model).parts:
        for proj in (p.q, p.k, p.v, p.o, p.up, p.down, p.gate_proj):
            module = getattr(proj, "module", proj)  # arch.Proj views -> the module holding the weights
            if module is not None and all(module is not m for m in out):  # fused Q/K/V counted once
                out.append(module)
    return out


def magnitude_prune(model: nn.Module, keep: float) -> list[nn.Linear]:
    """Zero the ``1 - keep`` fraction of smallest |w| over all layer projections (global L1).

    Masks stay attached as ``torch.nn.utils.prune`` reparametrisations (so fine-tuning
    keeps the zeros); returns the pruned modules.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"magnitude_prune: keep fraction must be in (0, 1], got {keep}")
    linears = prunable_linears(model)
    total = sum(lin.weight.numel() for lin in linears)
    amount = round((1.0 - keep) * total)
    prune.global_unstructured(
        [(lin, "weight") for lin in linears], pruning_method=prune.L1Unstructured, amount=amount
    )
    return linears


def make_permanent(model: nn.Module) -> None:
    """Fold every attached pruning mask into its weight (``prune.remove``)."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the prunable layer weights."""
    linears = prunable_linears(model)
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears)
    return zeros / sum(lin.weight.numel() for lin in linears)


def nonzero_flops_ratio(model: nn.Module, fm: FlopsModel, seq_len: int) -> float:
    """FLOPs an ideal sparse kernel would execute / dense FLOPs (attention scores stay dense)."""
    parts = resolve(model).parts
    dense = fm.dense(seq_len)
    saved = 0.0
    for p in parts:
        for lin in (p.q, p.k, p.v, p.o, p.up, p.down, p.gate_proj):
            if lin is not None:
                saved += 2.0 * seq_len * float((lin.weight == 0).sum())
    return (dense - saved) / dense
