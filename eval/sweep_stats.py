"""The sweep's statistics: seeds averaged, paired bootstrap intervals, the issue's goals judged.

Every point file stores per-example correctness on the evaluation split
(``correct``: a string of 0/1 in the split's fixed, length-sorted order), so
two methods are compared on the *same* examples: the paired bootstrap
resamples examples, and a method's per-example score is its correctness
averaged over its seeds. Seed-to-seed spread is reported as mean ± std
(sample std, ddof=1).

A goal gets a verdict only when the data can support one:

- **MET**: the estimate reaches the goal *and* the interval excludes the null
  value (0 for "beats", the tolerance for "within x of dense");
- **MISSED by m**: the estimate falls short of the goal by m (the line says
  when the interval still reaches the goal: the shortfall is not significant);
- **NOT SHOWN**: the estimate reaches the goal but the interval includes the
  null value ("not significant");
- no verdict at all when a contender has fewer than ``stats.min_seeds`` seeds,
  or on the quick grid (its label says why).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CONTENDERS = (
    "dynamic",
    "static_gates",
    "early_exit",
    "static_early_exit",
    "static_gates_ft",
    "static_cascade",
    "static_cascade_ft",
)
# Our dynamic modes: the goals compare the best of them (by mean accuracy at the goal's budget)
ADAPTIVE = ("dynamic", "static_early_exit", "static_cascade", "static_cascade_ft")
VARIABLE_COST = ("early_exit", *ADAPTIVE)  # per-input FLOPs vary
# Static methods "best static" is chosen from (magnitude saves no executed FLOPs, see notes).
STATIC_STRUCTURED = ("ln_structured", "iterative", "static_gates", "static_gates_ft", "search", "random")
GOAL_BUDGET = 0.25
GOAL_MARGIN_PT = 1.0
MOONSHOT_PT = 3.0
DENSE_BUDGET = 0.5
DENSE_TOLERANCE_PT = 0.5
FLOPS_TOLERANCE = 0.02
SKIP_MEAN = {"method", "budget", "seed", "structure", "notes", "correct", "n_seeds", "seeds"}


#: two-sided 95 % Student t quantiles by degrees of freedom (values - 1); 1.96 beyond the table
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student t-interval of the mean of ``values`` (e.g. per-seed paired
    differences); low and high are nan below two values."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return (float(v.mean()) if len(v) else float("nan")), float("nan"), float("nan")
    half = _T95.get(len(v) - 1, 1.96) * float(np.std(v, ddof=1)) / len(v) ** 0.5
    return float(v.mean()), float(v.mean()) - half, float(v.mean()) + half


def encode_correct(correct: np.ndarray) -> str:
    return "".join("1" if c else "0" for c in np.asarray(correct, dtype=bool))


def decode_correct(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def aggregate(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget), in first-seen order: numbers averaged over seeds, plus
    ``accuracy_std`` (nan for one seed), ``n_seeds`` and ``seeds``; text fields from the first seed."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["method"], round(float(p["budget"]), 6)), []).append(p)
    rows = []
    for (method, budget), ps in groups.items():
        ps = sorted(ps, key=lambda p: int(p.get("seed", 0)))
        row: dict[str, Any] = {k: v for k, v in ps[0].items() if k in ("structure", "notes")}
        row.update(method=method, budget=budget, n_seeds=len(ps), seeds=[int(p.get("seed", 0)) for p in ps])
        for key in {k for p in ps for k in p} - SKIP_MEAN:
            values = [_num(p.get(key)) for p in ps]
            values = [v for v in values if v is not None]
            if values and all(not isinstance(p.get(key), (dict, list)) for p in ps):
                row[key] = float(np.mean(values))
        accs = [_num(p.get("accuracy")) for p in ps]
        accs = [a for a in accs if a is not None]
        row["accuracy_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else float("nan")
        rows.append(row)
    return rows


def paired_bootstrap(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], resamples: int, confidence: float, seed: int = 0
) -> tuple[float, float, float]:
    """(estimate, low, high) of accuracy(a) - accuracy(b) in points; a, b: per-seed correctness
    arrays over the same examples. Resamples examples (percentile interval)."""
    pa, pb = np.mean(np.stack(a), axis=0), np.mean(np.stack(b), axis=0)
    if pa.shape != pb.shape:
        raise ValueError(f"paired bootstrap needs the same examples, got {pa.shape} vs {pb.shape}")
    d = pa.astype(np.float64) - pb
    n = d.shape[0]
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, 1000):  # chunks keep the index matrix small
        idx = rng.integers(0, n, size=(min(1000, resamples - start), n))
        means.append(d[idx].mean(1))
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(np.concatenate(means), [alpha, 1.0 - alpha])
    return 100 * float(d.mean()), 100 * float(lo), 100 * float(hi)


@dataclass
class Goal:
    """One goal: ``estimate >= goal`` is wanted; significance = the interval excludes ``null``."""

    text: str
    detail: str
    estimate: float | None
    low: float | None
    high: float | None
    goal: float
    null: float
    confidence: float
    missing_seeds: str = ""  # why no verdict (too few seeds), empty when there are enough

    def verdict(self) -> str:
        if self.estimate is None or self.low is None or self.high is None:
            return "n/a (points missing)"
        if self.missing_seeds:
            return f"no verdict: {self.missing_seeds}"
        if self.estimate >= self.goal:
            if self.low > self.null:
                return f"MET (margin {self.estimate - self.goal:+.2f} pt over the goal)"
            return f"NOT SHOWN: the estimate reaches the goal but the interval includes {self.null:+g}: not significant"
        short = f"MISSED by {self.goal - self.estimate:.2f} pt"
        return short + (
            " (the interval still reaches the goal: not significant)" if self.high >= self.goal else ""
        )

    def line(self, indicative: str | None = None) -> str:
        if self.estimate is None:
            return f"{self.text}: n/a (points missing)"
        numbers = (
            f"{self.detail}: {self.estimate:+.2f} pt, paired bootstrap {self.confidence:.0%} CI "
            f"[{self.low:+.2f}, {self.high:+.2f}]"
        )
        if indicative:
            return f"{self.text}: {numbers} ({indicative}; no verdict)"
        return f"{self.text}: {numbers} -> {self.verdict()}"


def _points(points: Sequence[dict[str, Any]], method: str, budget: float) -> list[dict[str, Any]]:
    return [
        p
        for p in points
        if p["method"] == method and abs(float(p["budget"]) - budget) < 1e-6 and p.get("correct")
    ]


def _acc_text(method: str, ps: Sequence[dict[str, Any]]) -> str:
    accs = [100 * float(p["accuracy"]) for p in ps]
    spread = f" ± {np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
    return f"{method} {np.mean(accs):.2f}{spread} % ({len(accs)} seed{'s' if len(accs) != 1 else ''})"


def compare(
    points: Sequence[dict[str, Any]],
    a: str,
    a_budget: float,
    b: str,
    b_budget: float,
    stats: Any,
    text: str,
    goal: float,
    null: float,
) -> Goal:
    pa, pb = _points(points, a, a_budget), _points(points, b, b_budget)
    if not pa or not pb:
        return Goal(text, "", None, None, None, goal, null, stats.confidence)
    est, lo, hi = paired_bootstrap(
        [decode_correct(p["correct"]) for p in pa],
        [decode_correct(p["correct"]) for p in pb],
        stats.resamples,
        stats.confidence,
    )
    few = [
        f"{m} has {len(ps)} seed(s) < {stats.min_seeds}"
        for m, ps in ((a, pa), (b, pb))
        if m in CONTENDERS and len(ps) < stats.min_seeds
    ]
    detail = f"{_acc_text(a, pa)} vs {_acc_text(b, pb)}"
    return Goal(text, detail, est, lo, hi, goal, null, stats.confidence, "; ".join(few))


def goal_budget(points: Sequence[dict[str, Any]]) -> float:
    budgets = sorted({float(p["budget"]) for p in points if p["method"] in ADAPTIVE})
    return GOAL_BUDGET if not budgets or GOAL_BUDGET in budgets else budgets[0]


def best_static(points: Sequence[dict[str, Any]], budget: float) -> str | None:
    return _best(points, STATIC_STRUCTURED, budget)


def best_adaptive(points: Sequence[dict[str, Any]], budget: float) -> str:
    """The dynamic mode with the best mean accuracy at ``budget`` ("dynamic" when none ran there)."""
    return _best(points, ADAPTIVE, budget) or "dynamic"


def _best(points: Sequence[dict[str, Any]], methods: Sequence[str], budget: float) -> str | None:
    means = {
        m: float(np.mean([float(p["accuracy"]) for p in ps]))
        for m in methods
        if (ps := _points(points, m, budget))
    }
    return max(means, key=lambda m: means[m]) if means else None


def goals(points: Sequence[dict[str, Any]], stats: Any) -> list[Goal]:
    """The issue's accuracy goals, each with a paired bootstrap interval (see module docstring)."""
    b = goal_budget(points)
    static = best_static(points, b) or "best static"
    mode, mode_half = best_adaptive(points, b), best_adaptive(points, DENSE_BUDGET)

    def named(m: str) -> str:  # which dynamic mode a goal line is about, when it is not the router
        return m if m == "dynamic" else f"dynamic mode {m}"

    beat = f"{named(mode)} beats the best static method by >= {GOAL_MARGIN_PT:g} pt at {b:.0%} FLOPs"
    dense = f"{named(mode_half)} within {DENSE_TOLERANCE_PT:g} pt of dense at {DENSE_BUDGET:.0%} FLOPs"
    specs = [  # (a, a's budget, b, b's budget, text, goal, null)
        (mode, b, static, b, f"{beat} (moonshot >= {MOONSHOT_PT:g})", GOAL_MARGIN_PT, 0.0),
        (mode, b, "early_exit", b, f"{named(mode)} beats early_exit at {b:.0%} FLOPs", 0.0, 0.0),
        (mode_half, DENSE_BUDGET, "dense", 1.0, dense, -DENSE_TOLERANCE_PT, -DENSE_TOLERANCE_PT),
    ]
    return [compare(points, *spec[:4], stats, *spec[4:]) for spec in specs]


def flops_lines(
    rows: Sequence[dict[str, Any]],
    methods: Sequence[str] = VARIABLE_COST,
    indicative: str | None = None,
) -> list[str]:
    """Executed mean FLOPs vs target (a measurement on the evaluation split: no interval needed;
    on an indicative grid the fact is stated without a verdict word)."""
    out = []
    for r in rows:
        if r["method"] not in methods or _num(r.get("flops_ratio")) is None:
            continue
        budget, got = float(r["budget"]), float(r["flops_ratio"])
        err = got / budget - 1.0
        word = (
            "MET" if abs(err) <= FLOPS_TOLERANCE else f"MISSED by {100 * (abs(err) - FLOPS_TOLERANCE):.1f} %"
        )
        if indicative:
            word = ("within" if abs(err) <= FLOPS_TOLERANCE else "outside") + " the tolerance (no verdict)"
        out.append(
            f"executed mean FLOPs of {r['method']} @ {budget:g}: {got:.3f} ({100 * err:+.1f} % of target, "
            f"p5 {float(r.get('flops_ratio_p5', got)):.3f}, p95 {float(r.get('flops_ratio_p95', got)):.3f}; "
            f"goal within ±{100 * FLOPS_TOLERANCE:.0f} %) -> {word}"
        )
    return out


def speed_lines(rows: Sequence[dict[str, Any]], methods: Sequence[str] = VARIABLE_COST) -> list[str]:
    """Measured speedup beside the ideal (dense FLOPs / executed FLOPs), per budget (reported, not judged)."""
    out = []
    for r in rows:
        if r["method"] not in methods:
            continue
        parts = []
        for key in ("bs1", "bs16"):
            s, ideal = _num(r.get(f"speedup_{key}")), _num(r.get(f"ideal_speedup_{key}"))
            if s is not None and ideal is not None:
                parts.append(f"{key} {s:.2f}x (ideal {ideal:.2f}x)")
        if parts:
            out.append(f"speedup of {r['method']} @ {float(r['budget']):g}: " + ", ".join(parts))
    return out
