"""Inference routing on the host: the router's MLP in torch, everything after it in numpy.

At batch 1 a dense MiniLM forward takes ~14 ms on 2 cores, and the routing
step — router MLP, nested logits, greedy selection under the budget, FLOPs
bookkeeping — is ~100 tiny tensor ops if run op by op in torch (~0.7 ms, 5 %
of the forward). Here the router's four layers run in torch (a handful of
ops) and the rest runs in numpy on a host copy of the router output (on CPU
a zero-copy view): ~0.1 ms.

This is the *same computation* as ``GatedModel._route`` in eval mode
(``Router.forward`` → ``nested_logits`` → ``select_under_budget`` →
``FlopsModel``), re-expressed for small arrays; tests/fast_path/test_route_host.py
holds the two equal (masks, FLOPs, gates, scores, expected FLOPs) over random
routers, budgets and gate configs. Used only where it applies: eval mode
under ``torch.no_grad()`` / ``torch.inference_mode()``, router-chosen gates,
the ``dynamic`` router, tensors on CPU;
:func:`route_on_host` returns None otherwise and the caller runs the general
path (which also raises the errors, e.g. a budget below the fixed cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynprune.gates import Gates, GateScores, UnitMasks
from dynprune.state import ForwardInfo, GateState

Tensor = torch.Tensor


def _nested(raw: np.ndarray, offset: float) -> np.ndarray:
    """gates.nested_logits in numpy: (..., n) raw -> non-increasing logits (softplus = logaddexp(0, x))."""
    first = raw[..., :1] + np.float32(offset)
    drops = np.logaddexp(np.float32(0.0), raw[..., 1:] - np.float32(4.0))
    return np.concatenate([first, first - np.cumsum(drops, axis=-1, dtype=raw.dtype)], axis=-1)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


@dataclass
class _Layout:
    """Per (model, sequence length, dtype) constants of the host route."""

    dense: float
    fixed: float
    kinds: list[tuple[str, int, int]]  # (kind, offset in the router output, units per layer), gated kinds
    layer_offset: int | None  # offset of the layer logits in the router output
    costs: np.ndarray  # (U,) FLOPs of each gated unit of one layer (heads, then slices)
    log_costs: np.ndarray  # (U,)
    tiled_costs: np.ndarray  # (L*U,)
    costs32: np.ndarray  # (U,) float32
    compulsory: float  # FLOPs of a kept layer's un-gated units
    gate_dtype: np.dtype


def _layout(gm: Any, seq: int, dtype: torch.dtype) -> _Layout:
    cache = gm.__dict__.setdefault("_host_route_layouts", {})
    key = (seq, dtype, id(gm.flops))
    if key not in cache:
        fm, sizes = gm.flops, gm.router.sizes
        n_layers = gm.n_gated
        unit_costs = {"head": (gm.parts.n_heads, fm.head_cost(seq)), "ffn": (gm.n_slices, fm.slice_cost(seq))}
        kinds, costs, offset, compulsory = [], [], 0, 0.0
        for kind in ("head", "ffn"):
            u, c = unit_costs[kind]
            if sizes[kind]:
                kinds.append((kind, offset, u))
                costs.append(np.full(u, c))
            else:
                compulsory += u * c
            offset += sizes[kind]
        cost = np.concatenate(costs) if costs else np.zeros(0)
        cache[key] = _Layout(
            dense=fm.dense(seq),
            fixed=fm.fixed(seq),
            kinds=kinds,
            layer_offset=offset if sizes["layer"] else None,
            costs=cost,
            log_costs=np.log(cost),
            tiled_costs=np.tile(cost, n_layers),
            costs32=cost.astype(np.float32),
            compulsory=compulsory,
            gate_dtype=torch.empty(0, dtype=dtype).numpy().dtype,
        )
    return cache[key]


def select_on_host(
    units: np.ndarray,
    lay: _Layout,
    layer: np.ndarray | None,
    available: np.ndarray,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """gates.select_under_budget on the host -> (unit masks (n, L, U), layer mask (n, L)), canonical.

    ``units`` (n, L, U): logits of the gated units of every layer (heads then
    FFN slices); ``layer`` (n, L) layer logits or None; ``threshold``: only
    units / layers with logit > threshold are eligible (mean budgets).
    """
    n, n_layers, n_units = units.shape
    compulsory = lay.compulsory
    if layer is not None:
        keep = layer.astype(np.float64) > (0.0 if threshold is None else threshold)
        if compulsory > 0:  # keep the best-scored kept layers whose compulsory cost fits
            order = np.argsort(-layer.astype(np.float64), axis=1, kind="stable")
            kept_sorted = np.take_along_axis(keep, order, 1)
            cum = np.cumsum(kept_sorted * compulsory, axis=1)
            keep = np.zeros_like(keep)
            np.put_along_axis(keep, order, kept_sorted & (cum <= available[:, None] * (1 + 1e-12)), 1)
    else:
        keep = np.ones((n, n_layers), dtype=bool)
    remaining = available - keep.sum(1) * compulsory if compulsory else available  # (n,)
    if n_units == 0:
        return np.zeros((n, n_layers, 0), dtype=bool), keep
    logit = units.astype(np.float64)
    key = _log_sigmoid(logit) - lay.log_costs  # (n, L, U)
    eligible = np.broadcast_to(keep[..., None], key.shape)
    if threshold is not None:
        eligible = eligible & (logit > threshold)
    key = np.where(eligible, key, -np.inf).reshape(n, -1)  # layer-major, heads before slices
    order = np.argsort(-key, axis=1, kind="stable")  # the eligible units (finite keys) first
    n_eligible = eligible.reshape(n, -1).sum(1)
    cum = np.cumsum(lay.tiled_costs[order], axis=1)  # nondecreasing: what fits is a prefix
    n_take = np.minimum((cum <= (remaining * (1 + 1e-12))[:, None]).sum(1), n_eligible)
    rank = np.argsort(order, axis=1)  # position of each unit in the greedy order
    return (rank < n_take[:, None]).reshape(n, n_layers, n_units), keep


def _router_raw(router: Any, hidden: Tensor, mask: Tensor | None, budget: np.ndarray) -> np.ndarray:
    """Router.forward's MLP (dynamic router) -> raw outputs (n, n_out) on the host.

    Torch for the pooling and the two Linear layers (numpy's BLAS would start
    its own threads next to torch's); the budget features [b, log b] enter the
    output layer as a rank-2 term in numpy instead of a concatenation.
    """
    if mask is None:
        pooled = hidden.mean(dim=1)  # (n, H)
    else:
        m = mask.to(hidden.dtype)[..., None]  # (n, T, 1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    norm, out = router.norm, router.out
    h = F.linear(F.layer_norm(pooled, norm.normalized_shape, norm.weight, norm.bias, norm.eps),
                 router.inp.weight, router.inp.bias)  # fmt: skip
    b = budget.astype(np.float32)[:, None]  # (n, 1)
    budget_inp = getattr(router, "budget_inp", None)  # GateConfig.budget_to_hidden (added by training)
    if budget_inp is not None:  # + Linear([b, log b]) into the hidden layer, as a rank-2 term
        wb = budget_inp.weight.detach().numpy()  # (r, 2)
        h = torch.from_numpy(
            h.numpy() + (b * wb[:, 0] + np.log(b) * wb[:, 1] + budget_inp.bias.detach().numpy())
        )
    z = router.act(h)
    if not router.cfg.budget_conditioned:
        return F.linear(z, out.weight, out.bias).numpy()
    r = z.shape[1]
    raw = F.linear(z, out.weight[:, :r], out.bias).numpy()  # (n, n_out)
    w = out.weight.detach()[:, r:].numpy()  # (n_out, 2)
    return raw + b * w[:, 0] + np.log(b) * w[:, 1]


def route_on_host(gm: Any, hidden: Tensor, state: GateState) -> ForwardInfo | None:
    """Eval-mode routing of ``GatedModel`` on the host, or None where it does not apply."""
    cfg, router = gm.gate_config, gm.router
    if (
        gm.training
        or state.forced_masks is not None
        or cfg.router != "dynamic"
        or hidden.device.type != "cpu"
        or torch.is_grad_enabled()  # scores keep their graph on the general path
        or state.budget is None
    ):
        return None
    batch, seq = hidden.shape[:2]
    lay = _layout(gm, seq, hidden.dtype)
    dense, fixed = lay.dense, lay.fixed
    budget = state.budget.numpy()  # (B,) cap per sample
    router_budget = budget if state.router_budget is None else state.router_budget.numpy()
    routed = router_budget < 1.0
    if not routed.all():
        if not routed.any():
            return ForwardInfo(state.budget, seq, dense, torch.full((batch,), dense, dtype=torch.float64))
        rows = np.flatnonzero(routed)
        rows_t = torch.from_numpy(rows)
        hidden, budget, router_budget = hidden.index_select(0, rows_t), budget[rows], router_budget[rows]
    else:
        rows, rows_t = None, None
    available = budget * dense - fixed
    n_layers = gm.n_gated
    if (available < 0).any() or (
        lay.layer_offset is None
        and lay.compulsory
        and (available < n_layers * lay.compulsory * (1 - 1e-12)).any()
    ):
        return None  # the general path raises the explanatory error
    mask = None if state.valid is None else state.attention_mask
    if mask is not None and rows_t is not None:
        mask = mask.index_select(0, rows_t)
    raw = _router_raw(router, hidden, mask, router_budget)  # (n, n_out)
    n = raw.shape[0]
    keep_logit = np.float32(cfg.init_keep_logit)
    scores = {}
    for kind, offset, u in lay.kinds:
        t = raw[:, offset : offset + u * n_layers].reshape(n, n_layers, u)
        scores[kind] = _nested(t, keep_logit) if cfg.nested else t + keep_logit
    layer = None if lay.layer_offset is None else raw[:, lay.layer_offset :] + keep_logit
    parts = list(scores.values()) or [np.zeros((n, n_layers, 0), np.float32)]
    units = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]  # (n, L, U)
    # expected FLOPs of the marginal keep probabilities (float32 like the general path)
    per_layer = (np.exp(_log_sigmoid(units)) * lay.costs32).sum(-1) + np.float32(lay.compulsory)  # (n, L)
    if layer is not None:
        per_layer = np.exp(_log_sigmoid(layer)) * per_layer
    expected = per_layer.sum(-1) + np.float32(fixed)
    take, keep = select_on_host(units, lay, layer, available, state.threshold)
    per_layer_flops = (take * lay.costs).sum(-1) + lay.compulsory  # (n, L), integer-valued: exact
    flops = fixed + (keep * per_layer_flops).sum(-1)
    per_kind, m = {}, 0
    for kind, _, u in lay.kinds:
        per_kind[kind] = take[..., m : m + u]
        m += u
    # kinds that are not gated: every unit of a kept layer
    m_head = per_kind.get("head", np.broadcast_to(keep[..., None], (n, n_layers, gm.parts.n_heads)))
    m_ffn = per_kind.get("ffn", np.broadcast_to(keep[..., None], (n, n_layers, gm.n_slices)))
    m_layer = keep
    if rows is not None:  # unrouted rows run dense: all units kept
        full = [np.ones((batch, *t.shape[1:]), dtype=bool) for t in (m_head, m_ffn, m_layer)]
        for f, t in zip(full, (m_head, m_ffn, m_layer)):
            f[rows] = t
        m_head, m_ffn, m_layer = full
        all_flops = np.full(batch, dense)
        all_flops[rows] = flops
        flops = all_flops
    masks = UnitMasks(*(torch.from_numpy(np.ascontiguousarray(t)) for t in (m_head, m_ffn, m_layer)))
    gates = Gates(*(torch.from_numpy(t.astype(lay.gate_dtype)) for t in (m_head, m_ffn, m_layer)), hard=True)
    return ForwardInfo(
        state.budget,
        seq,
        dense,
        torch.from_numpy(flops),
        gates=gates,
        masks=masks,
        scores=GateScores(
            *(None if scores.get(k) is None else torch.from_numpy(scores[k]) for k in ("head", "ffn")),
            None if layer is None else torch.from_numpy(layer),
        ),
        routed_rows=rows_t,
        expected_flops=torch.from_numpy(expected.astype(np.float32)),
    )
