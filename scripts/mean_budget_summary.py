"""rows.csv + per_example.npz (scripts/mean_budget_eval.py) -> summary.csv + summary.md.

    python scripts/mean_budget_summary.py results/minilm_rt/mean_budget
    python scripts/mean_budget_summary.py results/news20/quick_3seeds/mean_budget "MiniLM / 20 Newsgroups"

Per method and target: accuracy and executed mean FLOPs ratio, mean ± std over seeds, the
per-input FLOPs distribution and where compute goes. Per pair (a mean-budget policy vs a cap
on the same or the control checkpoint): a paired bootstrap over test examples (the same test
split for every seed; each resample draws one set of example indices and averages the
difference over the seeds), 95 % percentile interval of the accuracy difference, and the
difference in executed mean FLOPs beside it.

The example bootstrap holds the trained models fixed: it says how much the test sample
moves the difference, not how much retraining with another seed would. So every pair also
gets the per-seed differences and a 95 % t-interval over seeds (paired by seed: same dense
teacher, same split); a verdict needs both intervals on the same side of 0.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from dynprune.eval.sweep_stats import t_interval

#: rows written before the eval recorded its machine
MACHINE = "2-core AMD EPYC VM, CPU only, torch 2.13.0+cpu, 2 threads"
ORDER = (
    "dense", "static_cap", "static_cascade", "static_cascade_refit", "static_cascade_governed", "dynamic_cap",
    "dynamic_cascade", "mean_ckpt_cap", "mean_threshold", "mean_threshold_refit", "mean_threshold_governed",
)  # fmt: skip
WHAT = {
    "dense": "dense teacher",
    "static_cap": "static learned gates (control), cap per input = target",
    "static_cascade": "static control, MeanBudget(target), cascade policy calibrated on validation",
    "dynamic_cap": "dynamic router trained with caps, cap per input = target",
    "dynamic_cascade": "dynamic cap-trained router, MeanBudget(target), cascade policy",
    "mean_ckpt_cap": "router trained with gate.budget_mode=mean, run with a cap per input = target",
    "mean_threshold": "router trained with gate.budget_mode=mean, MeanBudget(target), threshold policy",
    "static_cascade_refit": "static_cascade re-fitted in the call that measured static_cascade_governed (the "
    "same fit, ungoverned: the governed row's reference)",
    "static_cascade_governed": "that fit with its confidence threshold governed online (dynprune.govern, prior "
    "128 inputs; test batches in a seeded random order)",
    "mean_threshold_refit": "mean_threshold re-fitted with mean_threshold_governed (its reference)",
    "mean_threshold_governed": "that fit with its threshold governed online (dynprune.govern)",
}
PAIRS = (  # (mean-budget policy, cap mode it is compared with)
    ("static_cascade", "static_cap"),
    ("dynamic_cascade", "dynamic_cap"),
    ("dynamic_cascade", "static_cap"),
    ("mean_threshold", "mean_ckpt_cap"),
    ("mean_threshold", "static_cap"),
    ("mean_threshold", "static_cascade"),
    ("static_cascade_governed", "static_cascade_refit"),
    ("static_cascade_governed", "static_cap"),
    ("mean_threshold_governed", "mean_threshold_refit"),
)
#: two-sided 95 % Student t quantiles by degrees of freedom (seeds - 1)
N_BOOT = 10_000


def _ms(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    a = np.asarray(values, dtype=float) * scale
    if a.size == 1:
        return f"{a[0]:.{digits}f} (1 seed)"
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1):.{digits}f}"


def paired_bootstrap(a: list[np.ndarray], b: list[np.ndarray], seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of mean(a_s - b_s), and its 95 % bootstrap interval (examples resampled,
    the same indices for every seed: the test split is shared)."""
    d = np.stack([x.astype(float) - y.astype(float) for x, y in zip(a, b)])  # (S, N)
    n = d.shape[1]
    rng = np.random.default_rng(seed)
    boots = np.empty(N_BOOT)
    for i in range(N_BOOT):
        boots[i] = d[:, rng.integers(0, n, n)].mean()
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def seed_t_interval(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[list[float], float, float]:
    """Per-seed accuracy differences and their 95 % t-interval over seeds (nan below 2 seeds)."""
    d = [float(x.mean() - y.mean()) for x, y in zip(a, b)]
    _, lo, hi = t_interval(d)
    return d, lo, hi


def main(root: Path, task: str = "MiniLM / Rotten Tomatoes") -> None:
    with (root / "rows.csv").open() as f:
        rows = list(csv.DictReader(f))
    z = dict(np.load(root / "per_example.npz"))
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], float(r["target"]))].append(r)
    seeds = sorted({int(r["seed"]) for r in rows})
    machines = sorted({r.get("machine") or MACHINE for r in rows})
    out_rows, md = [], []
    md += [
        f"# Mean budgets vs caps per input ({task}, quick recipe)",
        "",
        f"Machine: {'; '.join(machines)} (shared with other sessions; accuracy and FLOPs only, no timing). Seeds: {', '.join(map(str, seeds))} (training seed; the data split is",
        "the same for every seed: split_seed 0). Test split, batch 64; every mean-budget policy was",
        "calibrated on the validation split and evaluated on test. Produced by",
        "`scripts/mean_budget_eval.py` + `scripts/mean_budget_summary.py`.",
        "",
        "Executed FLOPs vs target: (test mean / target − 1), mean over seeds; the goal is within ±2 %.",
        "FLOPs by quartile: mean executed FLOPs ratio per quartile of input length (shortest first)",
        "and of the dense teacher's confidence (least confident first), averaged over seeds.",
        "",
        "| method | target | seeds | accuracy % | executed mean FLOPs % | vs target | p5 / p50 / p95 % | FLOPs by length Q1→Q4 % | FLOPs by dense confidence Q1→Q4 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cal = sorted({r["calibration_examples"] for r in rows if r.get("calibration_examples")})
    if cal:
        md.insert(
            6,
            "Calibration: all 1,276 validation examples (the whole split)."
            if cal == ["1276"]
            else f"Calibration: the first {', '.join(cal)} validation examples (a random subset of the split).",
        )
    for (method, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], ORDER.index(kv[0][0]))):
        acc = [float(r["accuracy"]) for r in rs]
        flops = [float(r["flops_ratio_mean"]) for r in rs]
        pct = "–"
        by_len = by_conf = "–"
        if rs[0].get("flops_ratio_p5"):
            pct = " / ".join(f"{100 * np.mean([float(r[k]) for r in rs]):.1f}" for k in
                             ("flops_ratio_p5", "flops_ratio_p50", "flops_ratio_p95"))  # fmt: skip
            by_len = " ".join(
                f"{100 * v:.1f}" for v in np.mean([json.loads(r["flops_by_length_q1_q4"]) for r in rs], 0)
            )
            by_conf = " ".join(
                f"{100 * v:.1f}" for v in np.mean([json.loads(r["flops_by_dense_conf_q1_q4"]) for r in rs], 0)
            )
        off = f"{100 * (np.mean(flops) / target - 1):+.1f} %" if target < 1 else "–"
        md.append(
            f"| {method} | {target:g} | {len(rs)} | {_ms(acc)} | {_ms(flops)} | {off} | {pct} | {by_len} | {by_conf} |"
        )
        out_rows.append({
            "method": method, "target": target, "seeds": len(rs),
            "accuracy_mean": np.mean(acc), "accuracy_std": np.std(acc, ddof=1) if len(acc) > 1 else "",
            "flops_ratio_mean": np.mean(flops), "flops_ratio_std": np.std(flops, ddof=1) if len(flops) > 1 else "",
        })  # fmt: skip
    md += ["", "Methods:", ""] + [f"- `{k}`: {v}" for k, v in WHAT.items() if any(m == k for m, _ in groups)]
    md += [
        "",
        "## Paired differences (mean-budget policy − cap mode), test split",
        "",
        f"Paired bootstrap over test examples ({N_BOOT} resamples; one set of indices per resample,",
        "the difference averaged over the seeds both methods have); 95 % percentile interval. It holds",
        "the trained models fixed; the seed columns show the training noise: the difference per seed",
        "and a 95 % t-interval over seeds. A verdict needs both intervals on the same side of 0.",
        "",
        "| target | policy − reference | seeds | Δ accuracy pt, example bootstrap [95 % CI] | Δ per seed pt | Δ over seeds [95 % t] | Δ executed mean FLOPs pt | reading |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in sorted({t for _, t in groups}):
        for a, b in PAIRS:
            both = [
                s for s in seeds if f"{s}/{a}/{target:g}/correct" in z and f"{s}/{b}/{target:g}/correct" in z
            ]
            if not both:
                continue
            ca = [z[f"{s}/{a}/{target:g}/correct"] for s in both]
            cb = [z[f"{s}/{b}/{target:g}/correct"] for s in both]
            d, lo, hi = paired_bootstrap(ca, cb)
            per_seed, tlo, thi = seed_t_interval(ca, cb)
            df = float(np.mean([z[f"{s}/{a}/{target:g}/ratio"].mean() - z[f"{s}/{b}/{target:g}/ratio"].mean()
                                for s in both]))  # fmt: skip
            if len(both) < 3:
                reading = "fewer than 3 seeds: no verdict"
            elif lo > 0 and tlo > 0:
                reading = "policy more accurate (both intervals above 0)"
            elif hi < 0 and thi < 0:
                reading = "policy less accurate (both intervals below 0)"
            elif lo > 0 or hi < 0:
                reading = "examples resolve it, seeds do not: no verdict"
            else:
                reading = "no difference resolved (interval contains 0)"
            seeds_cell = " / ".join(f"{100 * x:+.2f}" for x in per_seed)
            t_cell = (
                "–"
                if np.isnan(tlo)
                else f"{100 * np.mean(per_seed):+.2f} [{100 * tlo:+.2f}, {100 * thi:+.2f}]"
            )
            md.append(
                f"| {target:g} | {a} − {b} | {len(both)} | {100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                f"| {seeds_cell} | {t_cell} | {100 * df:+.2f} | {reading} |"
            )
            out_rows.append({"method": f"{a} - {b}", "target": target, "seeds": len(both),
                             "accuracy_mean": d, "ci_low": lo, "ci_high": hi, "flops_ratio_mean": df,
                             "seed_t_low": tlo, "seed_t_high": thi})  # fmt: skip
    keys: list[str] = []
    for r in out_rows:
        keys += [k for k in r if k not in keys]
    with (root / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(out_rows)
    (root / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python scripts/mean_budget_summary.py DIR ['MODEL / TASK' for the title]")
    main(Path(sys.argv[1]), *sys.argv[2:])
