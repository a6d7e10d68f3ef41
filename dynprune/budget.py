"""Budgets: a cap per input (a float or a (B,) tensor) or a mean over inputs (:class:`MeanBudget`).

- ``budget=0.5``: every input may spend at most 0.5 of dense FLOPs (greedy fill
  under that cap: every input costs about the same).
- ``budget=MeanBudget(0.25)``: the inputs spend 0.25 of dense FLOPs *on
  average*; how much each input gets is decided per input, by a policy whose
  parameters were calibrated on the validation split and saved with the gates
  (``dynprune calibrate``; :mod:`dynprune.calibration`). ``cap`` adds a hard
  bound per input (a per-request ceiling).

Text form (CLI, sweep, server): ``"0.5"``, ``"mean:0.25"``, ``"mean:0.25,cap:0.6"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynprune.config import check_budget_value


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


def parse_budget(text: str | float) -> float | MeanBudget:
    """``"0.5"`` -> 0.5 (cap per input); ``"mean:0.25"`` / ``"mean:0.25,cap:0.6"`` -> MeanBudget."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return check_budget_value(text)
    s = str(text).strip().lower()
    if not s.startswith("mean:"):
        try:
            value = float(s)
        except ValueError:
            raise ValueError(
                f"budget {text!r} is neither a number in (0, 1] (a cap per input, e.g. 0.5) nor a mean "
                "budget ('mean:0.25' or 'mean:0.25,cap:0.6')"
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


def budget_spec(budget: float | MeanBudget) -> str:
    """The text form of a budget (inverse of :func:`parse_budget`)."""
    if isinstance(budget, MeanBudget):
        return budget.spec
    return f"{float(budget):g}"
