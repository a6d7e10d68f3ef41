"""Keep a mean FLOPs budget on target when the inputs differ from the calibration inputs.

A mean-budget policy has one knob (an early-exit confidence threshold, a cascade's re-run
threshold, a router's logit threshold) fitted on validation inputs so that their mean FLOPs
equals the target. Inputs that differ — 20 Newsgroups' later-dated test file, traffic that
drifts — spend more or less: early exit's validation thresholds landed 3–5 % over the target on
that test file (results/news20/full_recipe/).

:class:`MeanGovernor` corrects this online, from what the policy actually spent and without
labels. The calibration gives ``solve(aim) -> (knob, predicted)``: the knob whose mean FLOPs ratio
on the calibration inputs is ``predicted`` (about ``aim``). After each batch the governor updates

    bias = sum over seen inputs of (spent ratio - predicted ratio of the knob it ran at)
           / (inputs seen + prior)

and the next batch runs at ``solve(target - bias)``. Inputs that spend a constant amount more than
the calibration predicts (the shift) are answered with a knob that spends that much less. ``prior``
(default 128 inputs) counts the calibration as that many inputs that spent what it predicted: the
batches of a stream differ by more than any shift (a batch of short reviews spends 0.18 of dense
where the mean is 0.25), and without it the first batch's noise alone moved the knob — on
Rotten Tomatoes, where validation and test inputs are alike, that made the mean land further off
than the calibrated knob did. The price is that part of a real shift stays uncorrected early on:
over n batches of b inputs about ``prior / b * ln(n) / n`` of it. Feed it batches in an order that
does not drift on purpose (e.g. not sorted by length): it adapts to whatever it is shown, and a
sorted stream teaches it a per-length knob.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

#: ``solve(aim) -> (knob, predicted mean FLOPs ratio of that knob on the calibration inputs)``
Solver = Callable[[float], tuple[float, float]]


class MeanGovernor:
    """The knob of a mean-budget policy, corrected after each batch so the running mean of executed
    FLOPs ratios stays at ``target`` (see the module docstring).

    ``bounds``: the aims ``solve`` accepts (e.g. the cheapest and the dearest mean the calibration
    inputs can reach); the governor never asks for one outside them.
    """

    def __init__(self, target: float, solve: Solver, bounds: tuple[float, float], prior: int = 128) -> None:
        lo, hi = bounds
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"governor target must be a mean FLOPs ratio > 0, got {target}")
        if prior < 0:
            raise ValueError(f"governor prior must be a number of inputs >= 0, got {prior}")
        self.prior = int(prior)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise ValueError(f"governor bounds must be finite with 0 <= low <= high, got {bounds}")
        self.target, self.bounds, self._solve = float(target), (float(lo), float(hi)), solve
        self.learning = True
        self._excess = 0.0  # sum over seen inputs of (spent - predicted)
        self._spent = 0.0
        self._seen = 0
        self.calibrated_knob, self._predicted = solve(self._aim(0.0))
        self.knob = self.calibrated_knob

    def _aim(self, bias: float) -> float:
        return min(max(self.target - bias, self.bounds[0]), self.bounds[1])

    @property
    def bias(self) -> float:
        """How much more these inputs spend than the calibration predicted: (spent - predicted)
        summed over the inputs seen, over (inputs seen + prior)."""
        return self._excess / (self._seen + self.prior) if self._seen + self.prior else 0.0

    @property
    def mean_spent(self) -> float | None:
        """Mean executed FLOPs ratio of the inputs seen (None before the first batch)."""
        return self._spent / self._seen if self._seen else None

    @property
    def seen(self) -> int:
        return self._seen

    def observe(self, spent: np.ndarray) -> None:
        """Account one batch run at :attr:`knob` (``spent``: (B,) executed FLOPs ratios) and move
        the knob for the next one. Does nothing once :meth:`freeze` was called."""
        if not self.learning:
            return
        r = np.asarray(spent, dtype=np.float64).reshape(-1)
        if r.size == 0 or not np.isfinite(r).all() or (r < 0).any():
            raise ValueError("governor.observe needs a non-empty batch of finite FLOPs ratios >= 0")
        self._excess += float((r - self._predicted).sum())
        self._spent += float(r.sum())
        self._seen += r.size
        self.knob, self._predicted = self._solve(self._aim(self.bias))

    def freeze(self) -> None:
        """Stop adapting: the knob stays where it is (e.g. for timing runs after an evaluation)."""
        self.learning = False


def curve_solver(curve: list[list[float]] | list[tuple[float, float]]) -> tuple[Solver, tuple[float, float]]:
    """A solver from a calibration curve, ``[[knob, mean FLOPs ratio on the calibration inputs], ...]``
    (the points a fit measured; the mean must be monotone in the knob, either way): the knob for an
    aim is interpolated linearly between the two points around it. Returns (solve, bounds): the
    bounds are the curve's lowest and highest mean."""
    points = np.asarray(curve, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2 or not np.isfinite(points).all():
        raise ValueError("a calibration curve needs >= 2 finite [knob, mean FLOPs ratio] points")
    points = points[np.argsort(points[:, 0], kind="stable")]
    step = np.diff(points[:, 1])
    if not ((step >= -1e-12).all() or (step <= 1e-12).all()):
        raise ValueError("a calibration curve's mean FLOPs ratio must be monotone in its knob")
    by_mean = points[np.argsort(points[:, 1], kind="stable")]
    means, first = np.unique(by_mean[:, 1], return_index=True)  # one knob per mean
    knobs = by_mean[first, 0]

    def solve(aim: float) -> tuple[float, float]:
        if len(means) == 1:
            return float(knobs[0]), float(means[0])
        predicted = min(max(aim, float(means[0])), float(means[-1]))
        return float(np.interp(predicted, means, knobs)), predicted

    return solve, (float(means[0]), float(means[-1]))
