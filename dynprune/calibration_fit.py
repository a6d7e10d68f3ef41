"""Fit a mean-budget policy on validation batches (``dynprune calibrate`` and training call this).

- threshold: the router's logits at the target are computed once per batch;
  the threshold is bisected until the mean executed FLOPs ratio over the
  batches equals the target (the same selection, :func:`select_under_budget`,
  and the same FLOPs formulas as inference); then one real pass measures it.
- cascade: one pass per candidate budget; for every (low, high) pair, the
  inputs are re-run in order of rising confidence while the mean (both passes
  counted) stays <= the target; the pair with the best validation accuracy wins.

Batches: dicts with ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``)
and ``labels``, padded to their longest member: the same batches as evaluation
(FLOPs depend on the padded length), so the fit holds at that batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynprune.budget import MeanBudget, ThresholdRoute
from dynprune.calibration import CalibrationEntry, CascadePolicy, ThresholdPolicy, check_policy_fits
from dynprune.gates import select_under_budget

if TYPE_CHECKING:
    from dynprune.model import GatedModel

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
LOW_FACTORS = (0.6, 0.7, 0.8, 0.9)  # cascade: first-pass budgets, as fractions of the target
HIGH_FACTORS = (1.5, 2.0, 3.0)  # second-pass budgets (and dense, 1.0)
CURVE_FACTORS = (0.5, 0.7, 0.8, 0.9, 0.95, 1.05, 1.1, 1.2, 1.3, 1.5)  # aims (x target) of the saved curve
CURVE_POINTS = 65  # cascade: points of its saved curve


@dataclass
class Pass:
    """Per-sample results of one pass over the batches (in batch order)."""

    ratio: np.ndarray  # (N,) executed FLOPs / dense
    correct: np.ndarray  # (N,) bool
    confidence: np.ndarray  # (N,) max softmax probability


def _inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k in INPUT_KEYS}


@torch.no_grad()
def _run(gated: GatedModel, batches: Sequence[dict[str, Any]], budget: Any) -> Pass:
    ratio, correct, conf = [], [], []
    for batch in batches:
        logits = gated(**_inputs(batch), budget=budget).logits.float()
        info = gated.last
        assert info is not None
        ratio.append((info.flops / info.dense_flops).double().cpu())
        correct.append((logits.argmax(-1) == batch["labels"]).cpu())
        conf.append(logits.softmax(-1).amax(-1).cpu())
    return Pass(*(torch.cat(t).numpy() for t in (ratio, correct, conf)))


def _threshold_flops(gated: GatedModel, cached: list[tuple[Any, Any, int]], threshold: float) -> float:
    """Mean executed FLOPs ratio over the cached router outputs at ``threshold``."""
    fm = gated.flops
    total, n = 0.0, 0
    for scores, available, seq in cached:
        m = select_under_budget(scores, available, fm, seq, threshold, ranking=gated.gate_config.unit_ranking)
        flops = fm.fixed(seq) + fm.gated_units(m.head.double(), m.ffn.double(), m.layer.double(), seq)
        total += float((flops / fm.dense(seq)).sum())
        n += flops.shape[0]
    return total / n


@torch.no_grad()
def fit_threshold(
    gated: GatedModel, batches: Sequence[dict[str, Any]], budget: MeanBudget, iters: int = 40
) -> CalibrationEntry:
    """The threshold at which the mean FLOPs ratio over ``batches`` is ``budget.target``."""
    check_policy_fits(gated, "threshold")
    cached = []
    for batch in batches:  # the router's logits at this target (they do not depend on the threshold)
        gated(**_inputs(batch), budget=ThresholdRoute(budget.target, 0.0, budget.cap))
        info = gated.last
        assert info is not None and info.scores is not None and info.routed_rows is None
        seq = info.seq_len
        available = info.budget.double() * info.dense_flops - gated.flops.fixed(seq)
        cached.append((info.scores, available, seq))
    threshold = _bisect_threshold(gated, cached, budget.target, iters)
    # the curve a governor corrects along: thresholds for aims around the target, with their means
    # here (the router's logits are those at the target, as a governed forward computes them)
    curve = {threshold: _threshold_flops(gated, cached, threshold)}
    for f in CURVE_FACTORS:
        t = _bisect_threshold(gated, cached, min(budget.target * f, 1.0), iters)
        curve[t] = _threshold_flops(gated, cached, t)
    check = _run(gated, batches, ThresholdRoute(budget.target, threshold, budget.cap))
    fitted = _fitted(check, batches, curve=sorted([t, m] for t, m in curve.items()))
    return CalibrationEntry(budget, ThresholdPolicy(threshold), fitted)


def _bisect_threshold(gated: GatedModel, cached: list[tuple[Any, Any, int]], aim: float, iters: int) -> float:
    """The threshold whose mean FLOPs ratio over the cached router outputs is ``aim`` (at most)."""
    lo, hi = -40.0, 40.0  # FLOPs fall as the threshold rises
    if _threshold_flops(gated, cached, lo) < aim:
        lo = -1e9  # every unit eligible: the mean cannot go higher (a cap, or a tiny model)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _threshold_flops(gated, cached, mid) > aim:
            lo = mid
        else:
            hi = mid
    return hi  # mean FLOPs <= aim


def _fitted(p: Pass, batches: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "n": int(p.ratio.shape[0]),
        "batch_size": int(max(b["input_ids"].shape[0] for b in batches)),
        "flops_ratio_mean": float(p.ratio.mean()),
        "flops_ratio_p5": float(np.percentile(p.ratio, 5)),
        "flops_ratio_p95": float(np.percentile(p.ratio, 95)),
        "accuracy": float(p.correct.mean()),
        **extra,
    }


def cascade_candidates(
    budget: MeanBudget, trained: tuple[float, float] | None
) -> tuple[list[float], list[float]]:
    """First- and second-pass budgets to try: around the target, inside the trained range (or dense)."""
    t = budget.target
    lo_r, hi_r = trained if trained is not None else (1e-3, 1.0)
    lows = sorted({round(min(max(t * f, lo_r), hi_r), 4) for f in LOW_FACTORS} - {t})
    highs = sorted({round(min(max(t * f, lo_r), hi_r), 4) for f in HIGH_FACTORS} | {1.0})
    lows = [b for b in lows if b < t]
    highs = [b for b in highs if b > t]
    return lows, highs


def best_cascade(low: Pass, high: Pass, target: float) -> tuple[float, float, float, int]:
    """(validation accuracy, mean FLOPs ratio, confidence threshold, inputs re-run) for one pair."""
    n = low.ratio.shape[0]
    order = np.argsort(low.confidence, kind="stable")  # least confident first
    conf = low.confidence[order]
    extra = np.concatenate([[0.0], np.cumsum(high.ratio[order])])  # (N+1,) re-run cost of the first k
    mean = (low.ratio.sum() + extra) / n
    feasible = np.flatnonzero(mean <= target + 1e-12)
    if feasible.size == 0:
        return -1.0, float(mean[0]), 0.0, 0
    k = int(feasible.max())
    while 0 < k < n and conf[k - 1] == conf[k]:  # "re-run if confidence < c" cannot split ties
        k -= 1
    gain = np.concatenate([[0], np.cumsum(high.correct[order].astype(int) - low.correct[order].astype(int))])
    acc = (low.correct.sum() + gain[k]) / n
    c = 0.0 if k == 0 else (2.0 if k == n else 0.5 * float(conf[k - 1] + conf[k]))
    return float(acc), float(mean[k]), c, k


@torch.no_grad()
def fit_cascade(
    gated: GatedModel,
    batches: Sequence[dict[str, Any]],
    budget: MeanBudget,
    trained: tuple[float, float] | None = None,
    passes: dict[float, Pass] | None = None,
) -> CalibrationEntry:
    """The (low, high, confidence) cascade with the best validation accuracy at mean FLOPs <= target.

    ``passes``: a cache of the per-budget passes over ``batches`` (filled here), so that fits
    of several targets on the same batches run each candidate budget once."""
    lows, highs = cascade_candidates(budget, trained)
    if budget.cap is not None:  # both passes together stay under the cap: second passes up to cap - low
        cap = budget.cap
        highs = sorted({h for h in highs if h + min(lows, default=1.0) <= cap + 1e-12}
                       | {round(cap - lo, 4) for lo in lows if cap - lo > budget.target})  # fmt: skip
    if not lows or not highs:
        raise ValueError(
            f"no cascade fits {budget.spec}: first-pass budgets {lows}, second-pass budgets {highs} "
            "(inside the trained budget range, low + high <= cap)"
        )
    passes = {} if passes is None else passes
    for b in sorted(set(lows) | set(highs)):
        if b in passes:
            continue
        try:
            passes[b] = _run(gated, batches, b)
        except ValueError:  # below what the model can run at some length: not a candidate
            continue
    best = None
    for lo in lows:
        for hi in highs:
            if lo not in passes or hi not in passes:
                continue
            if budget.cap is not None and lo + hi > budget.cap + 1e-12:
                continue
            acc, mean, c, k = best_cascade(passes[lo], passes[hi], budget.target)
            key = (acc, mean)
            if best is None or key > best[0]:
                best = (key, lo, hi, c, k)
    if best is None or best[0][0] < 0:
        raise ValueError(f"no cascade reaches a mean of at most {budget.target:g} on these batches")
    (acc, mean), lo, hi, c, k = best
    n = passes[lo].ratio.shape[0]
    rerun = passes[lo].confidence < c
    ratio = passes[lo].ratio + np.where(rerun, passes[hi].ratio, 0.0)
    correct = np.where(rerun, passes[hi].correct, passes[lo].correct)
    p = Pass(ratio, correct, passes[lo].confidence)
    fitted = _fitted(
        p,
        batches,
        rerun_fraction=float(k / n),
        candidates={"low": lows, "high": highs},
        curve=cascade_curve(passes[lo], passes[hi], c),
    )
    return CalibrationEntry(budget, CascadePolicy(lo, hi, c), fitted)


def cascade_curve(low: Pass, high: Pass, confidence: float) -> list[list[float]]:
    """[confidence threshold, mean FLOPs ratio] of re-running the k least confident inputs, for
    CURVE_POINTS values of k from none to all (and the fitted ``confidence``): what a governor
    moves the cascade's threshold along."""
    n = low.ratio.shape[0]
    conf = np.sort(low.confidence, kind="stable")
    ks = np.unique(np.linspace(1, n - 1, CURVE_POINTS - 2).astype(int)) if n > 1 else []
    knobs = {confidence, 0.0, 2.0, *(0.5 * (conf[k - 1] + conf[k]) for k in ks)}
    points = {}
    for c in knobs:
        rerun = low.confidence < c
        points[float(c)] = float((low.ratio + np.where(rerun, high.ratio, 0.0)).mean())
    return sorted([c, m] for c, m in points.items())


def fit(
    gated: GatedModel,
    batches: Sequence[dict[str, Any]],
    budget: MeanBudget,
    policy: str = "auto",
    trained: tuple[float, float] | None = None,
    passes: dict[float, Pass] | None = None,
) -> CalibrationEntry:
    """Fit ``policy`` (auto: threshold for mean-mode checkpoints, else cascade) for ``budget``
    (``passes``: the cascade's cache of passes over these batches, see :func:`fit_cascade`)."""
    if policy == "auto":
        policy = "threshold" if gated.gate_config.budget_mode == "mean" else "cascade"
    if policy not in ("threshold", "cascade"):
        raise ValueError(f"policy must be auto, threshold or cascade, got {policy!r}")
    was_training = gated.training
    gated.eval()
    try:
        if policy == "threshold":
            return fit_threshold(gated, batches, budget)
        return fit_cascade(gated, batches, budget, trained, passes)
    finally:
        gated.train(was_training)
