"""Norm-based structured pruning of heads and FFN neurons (``ln_structured``), and budgets.

Scores (data-free, like ``torch.nn.utils.prune.ln_structured`` but over the
whole structure a unit owns): a head's score is the L_p norm of all weights
that belong to it (its Q, K and V rows and its O columns); an FFN neuron's is
the L_p norm of its up row (and gate row) and its down column.

Allocation to a FLOPs budget (formulas of :mod:`dynprune.flops` at a
reference sequence length): :func:`uniform_counts` keeps the same number of
heads and neurons in every layer (heads and neurons at about the same
fraction), :func:`counts_from_ratios` turns per-layer keep ratios into counts
that fit the budget (used by the sub-network search).

Works on unpruned *and* physically pruned models (iterative pruning scores
the current, smaller model): layers are read by :func:`dynprune.arch.layer_parts`,
which skips the uniform-width check of :func:`dynprune.arch.resolve`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from dynprune.eval.structure import Structure
from torch import nn

from dynprune.arch import layer_parts
from dynprune.flops import FlopsModel

Tensor = torch.Tensor


def _norm(t: Tensor, p: float, dim: int) -> Tensor:
    return t.detach().float().abs().pow(p).sum(dim=dim)


def ln_scores(model: nn.Module, head_dim: int, p: float = 2.0) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: head scores (n_heads_now,) and neuron scores (ffn_now,), L_p norms."""
    heads, neurons = [], []
    for lp in layer_parts(model):
        n_heads = lp.q.out_features // head_dim
        rows = sum(_norm(lin.weight, p, 1) for lin in (lp.q, lp.k, lp.v))  # (n_heads * d,)
        cols = _norm(lp.o.weight, p, 0)  # (n_heads * d,)
        heads.append((rows + cols).reshape(n_heads, head_dim).sum(1).pow(1.0 / p))
        mass = _norm(lp.up.weight, p, 1) + _norm(lp.down.weight, p, 0)
        if lp.gate_proj is not None:
            mass = mass + _norm(lp.gate_proj.weight, p, 1)
        neurons.append(mass.pow(1.0 / p))
    return heads, neurons


def top_units(scores: Sequence[Tensor], counts: Sequence[int]) -> list[list[int]]:
    """Indices of the ``counts[l]`` highest scores of each layer (ties: lower index first)."""
    out = []
    for s, k in zip(scores, counts):
        order = torch.argsort(s, descending=True, stable=True)
        out.append(sorted(order[: int(k)].tolist()))
    return out


def select(
    current: Structure, head_scores: Sequence[Tensor], neuron_scores: Sequence[Tensor],
    head_counts: Sequence[int], neuron_counts: Sequence[int],
) -> Structure:  # fmt: skip
    """Keep the top-scored units of the *current* structure -> a new Structure in original indices.

    ``head_scores`` / ``neuron_scores`` have one entry per layer ``current`` keeps (in layer
    order), over the units it keeps there in the order of its sorted indices, i.e. over the
    positions of a model pruned to ``current``. ``head_counts`` / ``neuron_counts`` are per
    original layer. Layers ``current`` removed stay removed.
    """
    heads, neurons, layers = [], [], []
    scores_iter = iter(zip(head_scores, neuron_scores))
    for layer in range(current.n_layers):
        if not current.layers[layer]:
            heads.append([])
            neurons.append([])
            layers.append(False)
            continue
        hs, ns = next(scores_iter)
        keep_h = top_units([hs], [head_counts[layer]])[0]
        keep_n = top_units([ns], [neuron_counts[layer]])[0]
        heads.append([current.heads[layer][i] for i in keep_h])
        neurons.append([current.neurons[layer][i] for i in keep_n])
        layers.append(bool(keep_h or keep_n))
    return Structure.from_indices(heads, neurons, layers)


def _available(fm: FlopsModel, budget: float, seq_len: int) -> float:
    """FLOPs the layers may spend at ``budget`` (the task head always runs)."""
    avail = budget * fm.dense(seq_len) - fm.task_head(seq_len)
    if avail <= 0:
        raise ValueError(
            f"budget {budget} leaves no FLOPs for the layers at sequence length {seq_len} "
            f"(the task head alone is {fm.task_head(seq_len) / fm.dense(seq_len):.4f} of dense)"
        )
    return avail


def uniform_counts(fm: FlopsModel, budget: float, seq_len: int, multiple: int = 1) -> tuple[int, int]:
    """(heads, neurons) kept in every layer: heads ≈ the budget's fraction, neurons fill the rest.

    ``multiple``: neuron counts are rounded down to a multiple of it (matmul-friendly widths).
    The result's FLOPs at ``seq_len`` are <= ``budget`` × dense.
    """
    per_layer = _available(fm, budget, seq_len) / fm.n_layers
    hc, nc = fm.head_cost(seq_len), fm.slice_cost(seq_len) / fm.slice_size
    frac = min(1.0, per_layer / fm.layer_cost(seq_len))
    heads = min(fm.n_heads, max(0, round(frac * fm.n_heads)))
    while heads > 0 and heads * hc > per_layer:
        heads -= 1
    neurons = int((per_layer - heads * hc) // nc)
    neurons = max(0, min(fm.ffn_dim, neurons - neurons % multiple))
    return heads, neurons


def counts_from_ratios(
    fm: FlopsModel, budget: float, seq_len: int, head_ratios: Sequence[float], ffn_ratios: Sequence[float],
    multiple: int = 1,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """Per-layer (heads, neurons) proportional to the given keep ratios, scaled to spend the
    budget: the largest common scale factor (bisection) whose rounded counts fit."""
    avail = _available(fm, budget, seq_len)
    hc, nc = fm.head_cost(seq_len), fm.slice_cost(seq_len) / fm.slice_size

    def counts(scale: float) -> tuple[list[int], list[int]]:
        h = [min(fm.n_heads, int(scale * r * fm.n_heads + 0.5)) for r in head_ratios]
        n = [min(fm.ffn_dim, int(scale * r * fm.ffn_dim / multiple) * multiple) for r in ffn_ratios]
        return h, n

    def cost(scale: float) -> float:
        h, n = counts(scale)
        return sum(h) * hc + sum(n) * nc

    lo, hi = 0.0, 1.0
    while cost(hi) <= avail and hi < 1e6:
        lo, hi = hi, hi * 2
        if all(c == fm.n_heads for c in counts(lo)[0]) and all(c == fm.ffn_dim for c in counts(lo)[1]):
            return counts(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cost(mid) <= avail else (lo, mid)
    return counts(lo)


def random_units(
    n_heads: int, ffn_dim: int, head_counts: Sequence[int], neuron_counts: Sequence[int], seed: int
) -> Structure:
    """Uniformly random heads and neurons with the given per-layer counts (the sanity control)."""
    g = torch.Generator().manual_seed(seed)
    heads = [torch.randperm(n_heads, generator=g)[:k].tolist() for k in head_counts]
    neurons = [torch.randperm(ffn_dim, generator=g)[:k].tolist() for k in neuron_counts]
    return Structure.from_indices(heads, neurons)


@torch.no_grad()
def expand_into(full: nn.Module, pruned: nn.Module, structure: Structure, head_dim: int) -> nn.Module:
    """Copy every weight of ``pruned`` (a physical pruning of ``full``'s architecture to ``structure``)
    back into its place in the full-size ``full`` (in place; units ``structure`` dropped keep
    ``full``'s values). Lets iterative pruning prune a fine-tuned pruned model again, always
    from full-size index space."""
    pruned_state = pruned.state_dict()
    layers_prefix = {id(p.layer) for p in layer_parts(full)}
    full_parts, pruned_parts = layer_parts(full), layer_parts(pruned)
    # everything outside the transformer layers (embeddings, pooler, classifier) by name
    inside = {name for name, mod in full.named_modules() if id(mod) in layers_prefix}
    for name, value in full.state_dict().items():
        if not any(name.startswith(prefix + ".") for prefix in inside) and name in pruned_state:
            value.copy_(pruned_state[name])
    kept = [i for i, k in enumerate(structure.layers) if k]
    for i, small in zip(kept, pruned_parts):
        big = full_parts[i]
        heads = torch.tensor(structure.heads[i], dtype=torch.long)
        rows = (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)  # (k*d,)
        cols = torch.tensor(structure.neurons[i], dtype=torch.long)
        for a, b in ((big.q, small.q), (big.k, small.k), (big.v, small.v), (big.up, small.up)):
            idx = rows if a is not big.up else cols
            a.weight[idx] = b.weight
            if a.bias is not None:
                a.bias[idx] = b.bias
        if big.gate_proj is not None and small.gate_proj is not None:
            big.gate_proj.weight[cols] = small.gate_proj.weight
        big.o.weight[:, rows] = small.o.weight
        big.down.weight[:, cols] = small.down.weight
        for a, b in ((big.o, small.o), (big.down, small.down)):
            if a.bias is not None:
                a.bias.copy_(b.bias)
        for a, b in ((big.attn_norm, small.attn_norm), (big.ffn_norm, small.ffn_norm)):
            a.load_state_dict(b.state_dict())
    return full
