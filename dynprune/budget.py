"""Budgets: a cap per input (a float or a (B,) tensor) or a mean over inputs (:class:`MeanBudget`).

- ``budget=0.5``: every input may spend at most 0.5 of dense FLOPs (greedy fill
  under that cap: every input costs about the same).
- ``budget=MeanBudget(0.25)``: the inputs spend 0.25 of dense FLOPs *on
  average*; how much each input gets is decided per input, by a policy whose
  parameters were calibrated on the validation split and saved with the gates
  (``dynprune calibrate``; :mod:`dynprune.calibration`). ``cap`` adds a hard
  bound per input (a per-request ceiling).

- ``budget=TimeBudget(4.0)``: every input may take at most 4 ms at batch 1 *as predicted by this
  machine's cost table* (``gates/cost_table.json``, made by ``dynprune bench calibrate``;
  :mod:`dynprune.cost_model`): units are priced by measured time instead of FLOPs.

Text form (CLI, sweep, server): ``"0.5"``, ``"mean:0.25"``, ``"mean:0.25,cap:0.6"``, ``"ms:4"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dynprune.config import check_budget_value

Tensor = torch.Tensor


@dataclass(frozen=True)
class MeanBudget:
    """Spend ``target`` of dense FLOPs on average over inputs, at most ``cap`` on any one input."""

    target: float
    cap: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", check_budget_value(self.target, "MeanBudget.target"))
        if self.cap is not None:
            cap = check_budget_value(self.cap, "MeanBudget.cap")
            if cap < self.target:
                raise ValueError(
                    f"MeanBudget.cap ({cap:g}) must be >= the mean target ({self.target:g}): "
                    "no input may spend more than the cap, so the mean could never reach the target"
                )
            object.__setattr__(self, "cap", cap)

    @property
    def spec(self) -> str:
        """Text form, also the key of its calibration: ``mean:0.25`` or ``mean:0.25,cap:0.6``."""
        return f"mean:{self.target:g}" + ("" if self.cap is None else f",cap:{self.cap:g}")

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class TimeBudget:
    """At most ``ms`` milliseconds per input, by the cost table's prediction of a batch-1 forward.

    Units are priced by their measured time on this machine (``GatedModel.cost_table``). The router
    reads ``router`` if given (a FLOPs fraction in (0, 1]), else the FLOPs budget with the same
    share of the gated layers' dense cost as ``ms`` has of their predicted dense time. A cap per
    input, for inference.
    """

    ms: float
    router: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)):
            raise ValueError(f"TimeBudget.ms must be a number of milliseconds > 0, got {self.ms!r}")
        value = float(self.ms)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"TimeBudget.ms must be a finite number of milliseconds > 0, got {self.ms!r}")
        object.__setattr__(self, "ms", value)
        if self.router is not None:
            object.__setattr__(self, "router", check_budget_value(self.router, "TimeBudget.router"))

    @property
    def spec(self) -> str:
        return f"ms:{self.ms:g}" + ("" if self.router is None else f",router:{self.router:g}")

    def __str__(self) -> str:
        return self.spec


@dataclass(frozen=True)
class ThresholdRoute:
    """A resolved mean budget for one forward: what a calibration (or training) turns MeanBudget into.

    The router reads ``target`` as its budget input; every head / FFN slice /
    layer whose logit exceeds ``threshold`` is eligible, and the eligible units
    are taken greedily under ``cap`` (all of them without a cap). Training in
    mean mode uses threshold 0 (a unit is kept with probability sigmoid(logit));
    inference uses the calibrated threshold.
    """

    target: float
    threshold: float
    cap: float | None = None

    def __post_init__(self) -> None:
        check_budget_value(self.target, "ThresholdRoute.target")
        if self.cap is not None:
            check_budget_value(self.cap, "ThresholdRoute.cap")
        if math.isnan(self.threshold):
            raise ValueError("ThresholdRoute.threshold must be a number, got nan")


def parse_budget(text: str | float) -> float | MeanBudget | TimeBudget:
    """``"0.5"`` -> 0.5 (cap per input); ``"mean:0.25"`` / ``"mean:0.25,cap:0.6"`` -> MeanBudget;
    ``"ms:4"`` -> TimeBudget(4.0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_budget_value(text)
    s = str(text).strip().lower()
    if s.startswith("ms:"):
        ms, sep, router = s[3:].partition(",router:")
        try:
            return TimeBudget(float(ms), float(router) if sep else None)
        except ValueError:
            raise ValueError(
                f"time budget {text!r} must look like 'ms:4' (milliseconds > 0) or 'ms:4,router:0.25'"
            ) from None
    if not s.startswith("mean:"):
        try:
            value = float(s)
        except ValueError:
            raise ValueError(
                f"budget {text!r} is neither a number in (0, 1] (a cap per input, e.g. 0.5), a mean "
                "budget ('mean:0.25' or 'mean:0.25,cap:0.6') nor a time budget ('ms:4')"
            ) from None
        return check_budget_value(value)
    fields: dict[str, float] = {}
    for i, part in enumerate(s.split(",")):
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or key not in ("mean", "cap") or (i == 0) != (key == "mean") or key in fields:
            raise ValueError(
                f"mean budget {text!r} must look like 'mean:0.25' or 'mean:0.25,cap:0.6' (got part {part!r})"
            )
        try:
            fields[key] = float(value)
        except ValueError:
            raise ValueError(
                f"mean budget {text!r}: {key} must be a number in (0, 1], got {value!r}"
            ) from None
    return MeanBudget(fields["mean"], fields.get("cap"))


def budget_spec(budget: float | MeanBudget | TimeBudget) -> str:
    """The text form of a budget (inverse of :func:`parse_budget`)."""
    if isinstance(budget, (MeanBudget, TimeBudget)):
        return budget.spec
    return f"{float(budget):g}"


def batch_and_device(args: tuple, kwargs: dict) -> tuple[int, torch.device]:
    for t in (*args, kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(t, Tensor):
            return t.shape[0], t.device
    raise ValueError("GatedModel needs input_ids or inputs_embeds (as a tensor) to know the batch size")


def normalize_budget(budget: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """float or (B,) tensor -> validated (B,) float64 tensor; nothing is clamped."""
    if isinstance(budget, Tensor):
        if budget.dim() == 0:
            budget = budget.reshape(1).expand(batch)
        elif budget.shape != (batch,):
            raise ValueError(
                f"per-sample budget must have shape ({batch},) for a batch of {batch}, got {tuple(budget.shape)}"
            )
        b = budget.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            value = float(budget)
        except (TypeError, ValueError) as err:
            raise ValueError(f"budget must be a float or a tensor, got {type(budget).__name__}") from err
        b = torch.full((batch,), value, dtype=torch.float64, device=device)
        if 0.0 < value <= 1.0:  # valid (NaN fails the test): skip the tensor checks (batch-1 latency)
            return b
    bad = ~(torch.isfinite(b) & (b > 0) & (b <= 1))
    if bool(bad.any()):
        raise ValueError(
            f"budget must be a fraction of dense FLOPs in (0, 1] (1.0 = dense); got {b[bad][0].item()!r}"
            + (f" at sample {int(bad.nonzero()[0])}" if batch > 1 else "")
        )
    return b


def route_budgets(
    budget: float | Tensor | ThresholdRoute, batch: int, device: torch.device
) -> tuple[Tensor, Tensor, float | None]:
    """What one forward routes with: (cap per sample (B,), the router's budget input (B,), the
    selection threshold or None). A cap is both the bound and the router's input; a resolved
    mean budget bounds each sample by its cap (1.0 without one) and feeds the router its target."""
    if isinstance(budget, ThresholdRoute):
        full = lambda v: torch.full((batch,), float(v), dtype=torch.float64, device=device)  # noqa: E731
        return full(1.0 if budget.cap is None else budget.cap), full(budget.target), budget.threshold
    caps = normalize_budget(budget, batch, device)
    return caps, caps, None
