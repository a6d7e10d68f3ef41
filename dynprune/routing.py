"""Routing of one gated forward: router logits -> the one selection under each sample's budget
-> gates, masks and FLOPs (``GatedModel._route``), and the forward hook that runs it on the
router's input (``GatedModel._route_hook``). docs/architecture.md, "One gated forward"."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dynprune.gates import (
    Gates,
    GateScores,
    add_noise,
    fill_ungated,
    probabilities,
    relaxed,
    select_under_budget,
    straight_through,
)
from dynprune.state import ForwardInfo, GateState

if TYPE_CHECKING:
    from dynprune.model import GatedModel

Tensor = torch.Tensor


def route_hook(gm: GatedModel, module: nn.Module, args: Any, output: Any) -> None:
    """``GatedModel._route_hook``: a forward hook on the router's input (the embeddings, or the
    last dense layer before ``router_layer``) that fills ``gm._state`` for the gated layers."""
    state = gm._state
    if not state.active:
        return
    if state.held is not None:  # a later step of a generation: the prefill's decision holds
        state.info, state.plans = state.held.info, state.held.plans
        state.gates = state.info.gates
        return
    hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
    if state.recorder is not None:  # training-free prefill: runs dense, routed after it
        state.route_input = hidden
        return
    state.info = gm._route(hidden, state)
    state.gates = state.info.gates


def route(gm: GatedModel, hidden: Tensor, state: GateState, given: GateScores | None = None) -> ForwardInfo:
    """``GatedModel._route``. Gates of one forward: router logits (or ``given`` logits for the whole batch, from a
    training-free router) -> the one selection under each sample's budget -> FLOPs."""
    cfg, fm = gm.gate_config, gm.flops
    batch, seq = hidden.shape[:2]
    dense = fm.dense(seq)
    assert state.budget is not None and state.router_budget is not None
    budget, router_budget = state.budget, state.router_budget  # (B,) cap per sample, router's input
    dims = (gm.n_gated, gm.parts.n_heads, gm.n_slices)
    prices, overhead, time_available = fm, 0.0, None  # FLOPs, or a TimeBudget's measured ms
    if state.time_ms is not None:
        prices, router_budget, time_available = time_route(gm, state.time_ms, seq, batch, hidden.device)
        if state.time_router is not None:  # TimeBudget(ms, router=b): the router reads b
            router_budget = torch.full_like(router_budget, state.time_router)
        overhead = prices.layer_overhead(seq)
    if state.forced_masks is not None:
        m = state.forced_masks
        flops = fm.fixed(seq, with_router=False) + fm.gated_units(
            m.head.double(), m.ffn.double(), m.layer.double(), seq
        )
        return ForwardInfo(budget, seq, dense, flops, gates=m.to_gates(hidden.dtype), masks=m)
    routed = router_budget < 1.0
    if not bool(routed.any()):
        return ForwardInfo(
            budget, seq, dense, torch.full((batch,), dense, dtype=torch.float64, device=hidden.device)
        )
    rows = None if bool(routed.all()) else routed.nonzero().squeeze(1)
    sub = lambda t: t if (rows is None or t is None) else t.index_select(0, rows)  # noqa: E731
    sub_budget = sub(budget)
    if time_available is None:  # (n,) FLOPs the gated layers may spend
        available = spendable(gm, sub_budget, seq)
    else:  # (n,) ms the gated layers may take
        available = sub(time_available)
    if given is None:
        scores = gm.router(sub(hidden), sub(state.attention_mask), sub(router_budget))
    else:
        scores = given if rows is None else given.index_rows(rows)
    n = sub_budget.shape[0]
    expected = None  # FLOPs of the soft gates: the training objective's, not computed in eval
    if gm.training:
        probs = fill_ungated(probabilities(scores), n, *dims, like=hidden)
        expected = fm.fixed(seq) + fm.gated_units(probs.head, probs.ffn, probs.layer, seq)
    masks = None
    if gm.training:
        noisy = add_noise(scores, cfg.nested)
        soft = fill_ungated(relaxed(noisy, gm.relaxation.temperature), n, *dims, like=hidden)
        if gm.relaxation.hard:
            masks = select_under_budget(
                noisy, available, prices, seq, state.threshold, overhead=overhead, ranking=cfg.unit_ranking
            )
            gates_sub = straight_through(masks, soft)
        else:
            gates_sub = soft
    else:
        masks = select_under_budget(
            scores, available, prices, seq, state.threshold, overhead=overhead, ranking=cfg.unit_ranking
        )
        gates_sub = masks.to_gates(hidden.dtype)
    gates = scatter_rows(gates_sub, rows, batch, dims, hidden)
    if rows is None and masks is not None:  # every row routed: the selection's (canonical) masks
        full_masks = masks
        flops = fm.fixed(seq) + fm.gated_units(
            masks.head.double(), masks.ffn.double(), masks.layer.double(), seq
        )
        return ForwardInfo(budget, seq, dense, flops, gates, full_masks, scores, rows, expected)
    full_masks = None if masks is None else gates.masks()
    if full_masks is not None:
        used = fm.gated_units(
            full_masks.head.double(), full_masks.ffn.double(), full_masks.layer.double(), seq
        )
        flops = torch.where(routed, fm.fixed(seq) + used, torch.full_like(used, dense))
    else:
        flops = torch.full((batch,), dense, dtype=torch.float64, device=hidden.device)
        flops = (
            flops.index_put((rows,), expected.detach().double())
            if rows is not None
            else expected.detach().double()
        )
    return ForwardInfo(
        budget,
        seq,
        dense,
        flops,
        gates=gates,
        masks=full_masks,
        scores=scores,
        routed_rows=rows,
        expected_flops=expected,
    )


def spendable(gm: GatedModel, budget: Tensor | float, seq: int) -> Tensor | float:
    """FLOPs the gated layers may spend under each sample's cap ``budget`` ((B,) tensor -> (B,) tensor;
    one float -> a float, no tensor ops: the CPU engine's batch-1 path) at length ``seq``; ValueError
    when a cap is below what always runs (router, task head, dense layers)."""
    fm = gm.flops
    dense = fm.dense(seq)
    if isinstance(budget, Tensor):
        available = budget.double() * dense - fm.fixed(seq)
        short = bool((available < 0).any())
    else:
        available = float(budget) * dense - fm.fixed(seq)
        short = available < 0
    if short:
        least = fm.fixed(seq) / dense
        lowest = float(budget.min()) if isinstance(budget, Tensor) else float(budget)
        raise ValueError(
            f"budget {lowest:.4f} is below the smallest this gated model can run at "
            f"sequence length {seq}: {least:.4f} of dense FLOPs (router, task head and "
            f"{gm.gate_config.router_layer} dense layer(s) always run)"
        )
    return available


def time_route(gm: GatedModel, ms: float, seq: int, batch: int, device: torch.device) -> tuple:
    """A TimeBudget at this length -> (the cost table, the router's input (B,), the ms the gated
    layers may take (B,)). The router reads the FLOPs budget with the same share of the gated
    layers' dense cost as the ms budget has of their dense time (at most 1 = dense): what the
    budget would be in FLOPs if the layers' time were proportional to their FLOPs."""
    table, fm = gm.cost_table, gm.flops  # the table: checked by GatedModel._gated_call (require_table)
    fixed = table.fixed(seq)
    if ms < fixed:
        raise ValueError(
            f"time budget {ms:g} ms is below the smallest this gated model can run at sequence length "
            f"{seq} on this machine: {fixed:.3f} ms (embeddings, router, task head and the engine call, "
            "by its cost table)"
        )
    share = min(1.0, (ms - fixed) / (table.dense(seq) - fixed))
    dense = fm.dense(seq)
    router = min(1.0, (fm.fixed(seq) + share * (dense - fm.fixed(seq))) / dense)
    full = lambda v: torch.full((batch,), float(v), dtype=torch.float64, device=device)  # noqa: E731
    return table, full(router), full(ms - fixed)


def scatter_rows(
    gates: Gates, rows: Tensor | None, batch: int, dims: tuple[int, int, int], like: Tensor
) -> Gates:
    """Gates for the routed rows -> full batch (unrouted rows: all ones = dense)."""
    if rows is None:
        return gates
    n_layers, n_heads, n_slices = dims

    def full(part: Tensor, *shape: int) -> Tensor:
        out = torch.ones(batch, *shape, dtype=part.dtype, device=part.device)
        return out.index_put((rows,), part)

    return Gates(
        full(gates.head, n_layers, n_heads),
        full(gates.ffn, n_layers, n_slices),
        full(gates.layer, n_layers),
        gates.hard,
    )
