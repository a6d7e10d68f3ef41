"""GateConfig: what to gate and how routers choose (a typed, validated dataclass)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

RouterKind = Literal["dynamic", "static", "random", "griffin"]
Execution = Literal["auto", "masked", "gathered"]
Backend = Literal["auto", "torch", "triton", "onnxruntime"]
EXECUTIONS: tuple[str, ...] = ("auto", "masked", "gathered")
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "onnxruntime")
UnitOrder = Literal["weight_norm", "none"]
BudgetMode = Literal["cap", "mean"]
UnitRanking = Literal["per_flop", "logit"]


@dataclass
class GateConfig:
    """How a model is gated.

    Units: every attention head, every FFN slice (``ffn_slice_size`` consecutive
    intermediate columns) and every whole layer; each kind can be switched off.

    With ``nested=True`` (default) the units of one kind in one layer are kept
    as a *prefix* of a fixed importance order (set at wrap time by
    ``unit_order``): samples differ in how far down the order they go. This
    makes every kept weight slice a view, which is what makes skipped work cost
    no time (docs/architecture.md). ``nested=False`` allows any subset.

    How gates are sampled in training (temperature, hard) is not configuration
    but training state: ``GatedModel.relaxation``, set by the training objective.
    A config describes the model and is saved with its gates: it is not changed after
    construction. To run some forwards on another path, ``with gated.running(execution=...)``.
    """

    heads: bool = True
    ffn: bool = True
    layers: bool = True
    ffn_slice_size: int = 128
    nested: bool = True
    unit_order: UnitOrder = "weight_norm"
    # Router. "griffin": training-free, gates from the prompt's own activation magnitudes
    # (dynprune/magnitude.py; needs layers=False, nested=False: see GateConfig.griffin())
    router: RouterKind = "dynamic"
    router_hidden: int = 128
    router_layer: int = 0  # the router reads the output of this many (always dense) layers
    budget_conditioned: bool = True
    init_keep_logit: float = 4.0
    # How the router was trained: "cap" (greedy fill to each sample's budget) or "mean" (the
    # Lagrangian on the batch-mean FLOPs, units kept where logit > 0: MeanBudget's threshold policy)
    budget_mode: BudgetMode = "cap"
    # How the hard selection ranks units under a budget: "logit" (a learned router's logits: the
    # Lagrangian already priced each unit's cost into them, so this rounds the soft gates it was
    # trained with) or "per_flop" (log σ(logit) − log cost: the training-free router's scores, and
    # gates saved before this option existed). docs/architecture.md, "Greedy selection"
    unit_ranking: UnitRanking = "logit"
    # Inference
    default_budget: float = 1.0
    execution: Execution = "auto"  # auto: masked in train mode, gathered in eval mode
    backend: Backend = "auto"  # gathered path: triton on CUDA; on CPU in eval the ONNX Runtime engine (dynprune.exec) when it can run the model, else torch

    def __post_init__(self) -> None:
        if not (self.heads or self.ffn or self.layers):
            raise ValueError("GateConfig: at least one of heads / ffn / layers must be gated")
        if not isinstance(self.ffn_slice_size, int) or self.ffn_slice_size <= 0:
            raise ValueError(f"GateConfig.ffn_slice_size must be a positive int, got {self.ffn_slice_size!r}")
        if self.router_hidden <= 0:
            raise ValueError(f"GateConfig.router_hidden must be > 0, got {self.router_hidden}")
        if self.router_layer < 0:
            raise ValueError(f"GateConfig.router_layer must be >= 0, got {self.router_layer}")
        check_choice("router", self.router, ("dynamic", "static", "random", "griffin"))
        if self.router == "griffin":
            if self.layers:
                raise ValueError(
                    "GateConfig(router='griffin') scores heads and FFN slices from the prompt's activations "
                    "and has no score for whole layers: set layers=False (or use GateConfig.griffin())"
                )
            if self.nested:
                raise ValueError(
                    "GateConfig(router='griffin') keeps the largest-activation units of each prompt, not "
                    "prefixes of a fixed order: set nested=False (or use GateConfig.griffin())"
                )
            if self.unit_ranking != "per_flop":
                raise ValueError(
                    "GateConfig(router='griffin') scores units for ranking per FLOP (dynprune/magnitude.py): "
                    "set unit_ranking='per_flop' (or use GateConfig.griffin())"
                )
        check_choice("execution", self.execution, EXECUTIONS)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("unit_order", self.unit_order, ("weight_norm", "none"))
        check_choice("budget_mode", self.budget_mode, ("cap", "mean"))
        check_choice("unit_ranking", self.unit_ranking, ("per_flop", "logit"))
        check_budget_value(self.default_budget, "GateConfig.default_budget")

    @classmethod
    def griffin(cls, **overrides: Any) -> GateConfig:
        """The training-free configuration in one call: ``wrap(model, GateConfig.griffin())``.

        Per sequence, the prompt runs dense and its own activation magnitudes choose the FFN
        slices and head units (KV groups) that the generated tokens use, under the budget
        (GRIFFIN-style; docs/training_free.md). Whole layers are not gated."""
        return cls(
            **{"router": "griffin", "layers": False, "nested": False, "unit_ranking": "per_flop", **overrides}
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateConfig:
        known = {f.name for f in fields(cls)}
        removed = sorted(set(data) & set(REMOVED_KEYS))
        if removed:
            notes = "; ".join(f"{k}: {REMOVED_KEYS[k]}" for k in removed)
            raise ValueError(f"GateConfig: keys {removed} were removed ({notes})")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"GateConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)


# Keys older versions wrote, and what became of them (dynprune.io drops them from old saved gates)
REMOVED_KEYS = {
    "budget_to_hidden": "every learned router now reads the budget in its hidden layer",
    "temperature": "training state, GatedModel.relaxation (set by the training objective)",
    "hard": "training state, GatedModel.relaxation (set by the training objective)",
}


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``, else a ValueError naming ``GateConfig.<name>``."""
    if value not in choices:
        raise ValueError(f"GateConfig.{name} must be one of {choices}, got {value!r}")


def check_positive(section: str, **values: float | int) -> None:
    """Every value is a finite number > 0, else a ValueError naming ``section.name`` (the
    training and sweep configs' sections validate their counts and rates with it)."""
    for name, value in values.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{section}.{name} must be a finite number > 0, got {value!r}")


def check_budget_value(budget: float, what: str = "budget") -> float:
    """Validate one budget (fraction of dense FLOPs); nothing is clamped."""
    try:
        value = float(budget)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number in (0, 1], got {budget!r}") from err
    if not math.isfinite(value) or not (0.0 < value <= 1.0):
        raise ValueError(f"{what} must be a fraction of dense FLOPs in (0, 1] (1.0 = dense), got {budget!r}")
    return value
