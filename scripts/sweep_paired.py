"""Paired comparisons of the sweep's contenders, per budget: points/*.json -> paired.md.

    python scripts/sweep_paired.py runs/sweep_news20_quick results/news20/quick_3seeds/paired.md

For a pair (a, b) at one budget: the example bootstrap of the sweep's summary
(dynprune.eval.sweep_stats.paired_bootstrap: per-example correctness averaged over seeds,
test examples resampled, models held fixed) and the per-seed differences with a 95 %
t-interval over seeds (paired by seed: seed s of a vs seed s of b; a one-seed method — dense,
the classic methods — is the same run for every seed). The verdict word follows the sweep's
rule (dynprune.eval.sweep_stats.Goal) on the bootstrap, and a claim is only made when the
t-interval over seeds agrees (excludes the null value too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from dynprune.eval.sweep_stats import (
    ADAPTIVE,
    CONTENDERS,
    STATIC_STRUCTURED,
    decode_correct,
    paired_bootstrap,
    t_interval,
)


def load(points: Path) -> dict[tuple[str, float], dict[int, dict]]:
    out: dict[tuple[str, float], dict[int, dict]] = {}
    for f in sorted(points.glob("*.json")):
        p = json.loads(f.read_text())
        out.setdefault((p["method"], round(float(p["budget"]), 6)), {})[int(p.get("seed", 0))] = p
    return out


def compare(pts: dict, a: str, b: str, budget: float, b_budget: float | None = None) -> str | None:
    pa, pb = pts.get((a, budget)), pts.get((b, b_budget or budget))
    if not pa or not pb:
        return None
    ca = {s: decode_correct(p["correct"]).astype(float) for s, p in pa.items()}
    cb = {s: decode_correct(p["correct"]).astype(float) for s, p in pb.items()}
    est, lo, hi = paired_bootstrap(list(ca.values()), list(cb.values()), 10000, 0.95)
    seeds = sorted(ca) if len(cb) == 1 else sorted(set(ca) & set(cb))
    per_seed = [100 * (ca[s].mean() - (cb[s] if s in cb else next(iter(cb.values()))).mean()) for s in seeds]
    if len(per_seed) > 1:
        _, t_lo, t_hi = t_interval(per_seed)
        t_int = f"[{t_lo:+.2f}, {t_hi:+.2f}]"
        t_side = "+" if t_lo > 0 else "-" if t_hi < 0 else "0"
    else:
        t_int, t_side = "n/a (1 seed)", "0"
    b_side = "+" if lo > 0 else "-" if hi < 0 else "0"
    if b_side == t_side == "+":
        reading = f"**{a} ahead** (both intervals > 0)"
    elif b_side == t_side == "-":
        reading = f"**{a} behind** (both intervals < 0)"
    elif b_side != "0" or t_side != "0":
        reading = "not resolved (the two intervals disagree)"
    else:
        reading = "no difference resolved"
    acc = lambda ps: 100 * np.array([float(p["accuracy"]) for p in ps.values()])  # noqa: E731
    fa, fb = (np.mean([float(p["flops_ratio"]) for p in ps.values()]) for ps in (pa, pb))
    return (
        f"| {budget:g} | {a} − {b} | {acc(pa).mean():.2f} vs {acc(pb).mean():.2f} | {est:+.2f} [{lo:+.2f}, {hi:+.2f}] "
        f"| {' / '.join(f'{d:+.2f}' for d in per_seed)} | {np.mean(per_seed):+.2f} {t_int} "
        f"| {100 * (fa - fb):+.2f} | {reading} |"
    )


def main() -> None:
    sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
    pts = load(sweep / "points")
    budgets = sorted({b for (m, b) in pts if m in CONTENDERS and m != "static_gates"})
    lines = [
        "| budget | difference | accuracy % (seed means) | example bootstrap, pt [95 %] | per seed, pt "
        "| over seeds, pt [95 % t] | Δ mean FLOPs pt | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in budgets:
        statics = {m: np.mean([float(p["accuracy"]) for p in pts[(m, b)].values()])
                   for m in STATIC_STRUCTURED if (m, b) in pts}  # fmt: skip
        best = max(statics, key=statics.get) if statics else None
        pairs = []
        for mode in ADAPTIVE:
            pairs += [(mode, "static_gates")] + ([(mode, best)] if best and best != "static_gates" else [])
            pairs += [(mode, "early_exit")]
        pairs += [("static_gates", "early_exit"), ("static_early_exit", "dynamic")]
        # static_gates_ft: static_gates with static_early_exit's extra steps, no exits (the equal-steps control)
        pairs += [("static_early_exit", "static_gates_ft"), ("static_gates_ft", "static_gates")]
        # the cascade's two forms: what the control's steps add to it
        pairs += [("static_cascade_ft", "static_cascade"), ("static_cascade_ft", "static_early_exit")]
        for a, c in dict.fromkeys(pairs):  # in order, each pair once (the best static may be the control)
            row = compare(pts, a, c, b)
            if row:
                lines.append(row)
        for mode in ADAPTIVE:
            row = compare(pts, mode, "dense", b, 1.0)
            if row:
                lines.append(row)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
