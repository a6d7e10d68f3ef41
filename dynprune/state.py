"""Per-forward gate state shared by the router hook and the gated layers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from dynprune.gates import Gates, GateScores, UnitMasks
from dynprune.plan import LayerPlan

Tensor = torch.Tensor


@dataclass
class ForwardInfo:
    """What one gated forward decided and spent (``GatedModel.last``).

    flops: per sample (B,) — exact executed FLOPs when gates are hard, the
    expected FLOPs of the soft gates otherwise. ``expected_flops`` keeps its
    graph (for the regulariser) whenever the router ran.
    """

    budget: Tensor
    seq_len: int
    dense_flops: float
    flops: Tensor
    gates: Gates | None = None  # None: ran dense
    masks: UnitMasks | None = None  # hard masks, full batch
    scores: GateScores | None = None  # router logits for rows ``routed_rows``
    routed_rows: Tensor | None = None
    expected_flops: Tensor | None = None
    passes: Tensor | None = None  # cascade (mean budgets): forwards each sample ran, 1 or 2
    # training-free router (GateConfig.griffin): this forward ran dense; ``decided`` holds the gates
    # its activations chose for the tokens after it (budget enforced at this forward's length)
    decided: ForwardInfo | None = None

    @property
    def flops_ratio(self) -> Tensor:
        return self.flops / self.dense_flops


@dataclass(frozen=True)
class Relaxation:
    """How train-mode forwards sample gates (``GatedModel.relaxation``; the training objective
    sets a new one every step). Eval mode ignores it: hard gates on the clean logits.

    temperature: of the binary-concrete (Gumbel-sigmoid) sample; hard: straight-through
    hard gates (chosen under the budget, on the noisy logits) instead of the soft sample.
    """

    temperature: float = 0.5
    hard: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
            raise ValueError(f"Relaxation.temperature must be a finite number > 0, got {self.temperature!r}")
        if self.temperature <= 0:
            raise ValueError(f"Relaxation.temperature must be a finite number > 0, got {self.temperature!r}")


@dataclass
class GateState:
    """Set by GatedModel.forward, filled by the router hook, read by every gated layer."""

    active: bool = False
    budget: Tensor | None = None  # (B,) cap per sample: the FLOPs a sample may spend
    router_budget: Tensor | None = None  # (B,) what the router reads (= budget, or a mean target)
    threshold: float | None = None  # mean budgets: only units with logit > threshold are eligible
    time_ms: float | None = None  # a TimeBudget: ms per input, units priced by GatedModel.cost_table
    time_router: float | None = None  # ... and what its router reads (None: derived from the table)
    attention_mask: Tensor | None = None
    valid: Tensor | None = None  # (B, T) bool, or None when there is no padding
    forced_masks: UnitMasks | None = None
    gathered: bool = False
    backend: str = "torch"
    gates: Gates | None = None
    plans: list[LayerPlan] | None = None
    hard_masks: UnitMasks | None = None  # cached by the gathered layers, once per forward
    info: ForwardInfo | None = None
    held: Any = None  # dynprune.kv_cache.HeldDecision of a generation's prefill, reused at later steps
    recorder: Any = None  # dynprune.magnitude.ActivationRecorder: a training-free prefill, run dense
    route_input: Tensor | None = None  # what the router hook saw (the training-free prefill routes later)
    extras: dict = field(default_factory=dict)

    def begin(
        self,
        budget: Tensor,
        attention_mask: Tensor | None,
        forced_masks: UnitMasks | None,
        gathered: bool,
        backend: str,
        router_budget: Tensor | None = None,
        threshold: float | None = None,
        time_ms: float | None = None,
        time_router: float | None = None,
    ) -> None:
        self.active = True
        self.budget, self.attention_mask, self.forced_masks = budget, attention_mask, forced_masks
        self.router_budget = budget if router_budget is None else router_budget
        self.threshold, self.time_ms, self.time_router = threshold, time_ms, time_router
        self.valid = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            self.valid = attention_mask.bool()
        self.gathered, self.backend = gathered, backend
        self.gates, self.plans, self.info, self.hard_masks = None, None, None, None

    def end(self) -> ForwardInfo | None:
        info = self.info
        self.active = False
        self.budget = self.attention_mask = self.valid = self.forced_masks = None
        self.router_budget, self.threshold, self.time_ms, self.time_router = None, None, None, None
        self.gates, self.plans, self.info, self.hard_masks = None, None, None, None
        self.held = self.recorder = self.route_input = None
        return info
