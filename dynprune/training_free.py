"""The training-free router's prefill (``GateConfig.griffin()``, docs/training_free.md): the
prompt runs dense with its activations recorded (``dynprune.magnitude``), then its gates are
chosen from them through the one selection (``GatedModel._route``) and held in the cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dynprune.gates import UnitMasks
from dynprune.kv_cache import GatedKVCache
from dynprune.magnitude import ActivationRecorder
from dynprune.plan import plan_forward
from dynprune.state import ForwardInfo

if TYPE_CHECKING:
    from dynprune.model import GatedModel

Tensor = torch.Tensor


def prefill_recorder(
    gm: GatedModel, held: Any, masks: UnitMasks | None, budgets: Tensor
) -> ActivationRecorder | None:
    """A recorder when this forward is a training-free router's prefill (run dense), else None."""
    if gm.gate_config.router != "griffin" or held is not None or masks is not None:
        return None
    if bool((budgets >= 1.0).all()):
        return None
    if gm.training:
        raise ValueError(
            "the griffin router is training-free and chooses gates in eval mode: call gated.eval()"
        )
    gated = gm.parts.parts[gm.gate_config.router_layer :]
    return ActivationRecorder(gated, gm.parts.n_heads, gm.n_slices)


def decide_from_prefill(gm: GatedModel, cache: GatedKVCache | None, batch: int) -> None:
    """After a training-free dense prefill: gates from its activations through the one selection
    (``_route``), the cache cut down to the kept units, and the decision held for later steps."""
    state = gm._state
    hidden, recorder = state.route_input, state.recorder
    if hidden is None:
        raise RuntimeError("the router hook did not run during the prefill")
    seq = hidden.shape[1]
    tokens = (
        state.valid.sum(1) if state.valid is not None else torch.full((batch,), seq, device=hidden.device)
    )
    fm = gm.flops
    scores = recorder.scores(
        gm.gate_config.heads, gm.gate_config.ffn, tokens, fm.head_cost(seq), fm.slice_cost(seq)
    )
    decided = gm._route(hidden, state, scores)
    assert decided.masks is not None
    m = decided.masks
    plans = plan_forward(m.head, m.ffn, m.layer)
    if cache is not None:
        cache.restrict(plans)
        cache.hold(decided, plans, batch)
    dense = gm.flops.dense(seq)
    ran = torch.full((batch,), dense, dtype=torch.float64, device=hidden.device)
    state.info = ForwardInfo(decided.budget, seq, dense, ran, decided=decided)
