"""Learned-router perplexity over seeds: `dynprune eval perplexity` output dirs -> summary.md / .csv.

    python scripts/lm_learned_summary.py --run seed0=DIR0 --run seed1=DIR1 --run seed2=DIR2 \
        [--reference DIR] [--goal-budget 0.6 --goal-ratio 1.05] --out results/smollm2_kjv/learned_quick

Each DIR is one `dynprune eval perplexity --method dense ... learned --gates RUN/gated/gates`
output (rows.jsonl: per-chunk NLL sums of every row; the same test chunks in every DIR). The
reference is the `dense` row of `--reference DIR` (default: of the first run), e.g. the original
dense model; every ratio is paired on chunks against it.

Per budget of the `learned` rows: per-seed perplexity, FLOPs ratio and × reference with its 95 %
chunk-bootstrap interval; over seeds the geometric mean × reference (ratios of perplexities are
averaged on the log scale: they span orders of magnitude when a router fails) with two intervals —
a 95 % t-interval over seeds on log(× reference), exponentiated (how much retraining moves it), and
a chunk bootstrap of the seeds' geometric mean (the same resampled chunks for every seed and the
reference: how much the test text moves it). A goal
`× reference <= goal_ratio at goal_budget` is "met" only when both intervals lie below it, "not
met" when both lie above it, otherwise "not established". Other methods found in the first run
(e.g. griffin, deterministic) are listed beside it with their chunk-bootstrap interval.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from dynprune.eval.sweep_stats import t_interval

#: two-sided 95 % Student t quantiles by degrees of freedom (seeds - 1)
RESAMPLES = 2000


def read_rows(run: Path) -> list[dict]:
    path = run / "rows.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no rows (run dynprune eval perplexity first)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ppl(nll: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Perplexity over the last axis (chunks)."""
    return np.exp(nll.sum(-1) / tokens.sum(-1))


def summarise(
    runs: dict[str, list[dict]], reference: dict, goal_budget: float, goal_ratio: float, seed: int = 0
):
    """Rows of the summary table (dicts) and the goal verdict line."""
    ref_nll = np.asarray(reference["chunk_nll"], dtype=float)
    ref_tok = np.asarray(reference["chunk_tokens"], dtype=float)
    n = ref_nll.shape[0]
    idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    ref_boot = ppl(ref_nll[idx], ref_tok[idx])  # (R,)
    ref_ppl = float(ppl(ref_nll, ref_tok))
    out: list[dict] = [
        {"method": "reference dense", "budget": 1.0, "seeds": "-", "flops_ratio": 1.0, "perplexity": ref_ppl,
         "ppl_per_seed": "", "ratio": 1.0, "ratio_per_seed": "", "t_lo": None, "t_hi": None,
         "boot_lo": 1.0, "boot_hi": 1.0}
    ]  # fmt: skip
    names = list(runs)
    first = runs[names[0]]
    budgets = sorted({r["budget"] for rows in runs.values() for r in rows if r["method"] == "learned"})
    verdict = f"no learned row at budget {goal_budget}"
    for b in budgets:
        per = [
            next((r for r in runs[s] if r["method"] == "learned" and r["budget"] == b), None) for s in names
        ]
        got = [(s, r) for s, r in zip(names, per) if r is not None]
        nll = np.stack([np.asarray(r["chunk_nll"], dtype=float) for _, r in got])  # (S, N)
        tok = np.stack([np.asarray(r["chunk_tokens"], dtype=float) for _, r in got])
        if nll.shape[1] != n:
            raise SystemExit("every run must score the same chunks as the reference")
        seed_ppl = ppl(nll, tok)  # (S,)
        ratios = seed_ppl / ref_ppl
        per_seed_boot = ppl(nll[:, idx], tok[:, idx]) / ref_boot  # (S, R)
        logs = np.log(ratios)
        mean_boot = np.exp(np.log(per_seed_boot).mean(0))  # geometric mean over seeds, per resample
        boot_lo, boot_hi = np.quantile(mean_boot, [0.025, 0.975]).tolist()
        t_lo = t_hi = None
        if len(got) >= 2:
            _, lo, hi = t_interval(logs)
            t_lo, t_hi = float(np.exp(lo)), float(np.exp(hi))
        seed_ci = [np.quantile(per_seed_boot[i], [0.025, 0.975]) for i in range(len(got))]
        out.append(
            {
                "method": "learned",
                "budget": b,
                "seeds": len(got),
                "flops_ratio": float(np.mean([r["flops_ratio"] for _, r in got])),
                "perplexity": float(np.exp(np.log(seed_ppl).mean())),
                "ppl_per_seed": " / ".join(f"{p:.2f}" for p in seed_ppl),
                "ratio": float(np.exp(logs.mean())),
                "ratio_per_seed": " / ".join(
                    f"{x:.3f} [{lo:.3f}, {hi:.3f}]" for x, (lo, hi) in zip(ratios, seed_ci)
                ),
                "t_lo": t_lo,
                "t_hi": t_hi,
                "boot_lo": boot_lo,
                "boot_hi": boot_hi,
            }
        )
        if abs(b - goal_budget) < 1e-9:
            highs = [boot_hi] + ([t_hi] if t_hi is not None else [])
            lows = [boot_lo] + ([t_lo] if t_lo is not None else [])
            if len(got) < 3:
                state = "not established (fewer than 3 seeds: an anecdote)"
            elif max(highs) <= goal_ratio:
                state = "met"
            elif min(lows) > goal_ratio:
                state = "not met"
            else:
                state = "not established"
            verdict = (
                f"goal × reference <= {goal_ratio} at budget {goal_budget}: {state} "
                f"(geometric mean {np.exp(logs.mean()):.3f}, t-interval "
                f"{'n/a' if t_lo is None else f'[{t_lo:.3f}, {t_hi:.3f}]'}, chunk bootstrap [{boot_lo:.3f}, {boot_hi:.3f}], "
                f"{len(got)} seed(s))"
            )
    for r in first:
        if r["method"] in ("dense", "learned"):
            continue
        x_nll = np.asarray(r["chunk_nll"], dtype=float)
        x_tok = np.asarray(r["chunk_tokens"], dtype=float)
        boot = ppl(x_nll[idx], x_tok[idx]) / ref_boot
        lo, hi = np.quantile(boot, [0.025, 0.975]).tolist()
        p = float(ppl(x_nll, x_tok))
        out.append(
            {"method": r["method"], "budget": r["budget"], "seeds": "deterministic", "flops_ratio": r["flops_ratio"],
             "perplexity": p, "ppl_per_seed": "", "ratio": p / ref_ppl, "ratio_per_seed": "", "t_lo": None,
             "t_hi": None, "boot_lo": lo, "boot_hi": hi}
        )  # fmt: skip
    return out, verdict


def _fmt_ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f"[{lo:.3f}, {hi:.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME=DIR, one per seed")
    p.add_argument("--reference", type=Path, default=None, help="DIR whose dense row is the reference")
    p.add_argument("--reference-name", default="dense (first run's dense row)")
    p.add_argument("--goal-budget", type=float, default=0.6)
    p.add_argument("--goal-ratio", type=float, default=1.05)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs[name] = read_rows(Path(path))
    ref_rows = read_rows(args.reference) if args.reference else next(iter(runs.values()))
    reference = next((r for r in ref_rows if r["method"] == "dense"), None)
    if reference is None:
        raise SystemExit("the reference run has no dense row")
    for name, rows in runs.items():  # a run's own dense row must be the reference's when no other is given
        dense = next((r for r in rows if r["method"] == "dense"), None)
        if args.reference is None and dense is not None and dense["chunk_nll"] != reference["chunk_nll"]:
            raise SystemExit(f"run {name}: its dense row differs from the first run's (another model?)")
    rows, verdict = summarise(runs, reference, args.goal_budget, args.goal_ratio)
    args.out.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with open(args.out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Reference: {args.reference_name}, perplexity {rows[0]['perplexity']:.2f}. Runs: "
        + ", ".join(f"{k} = {v}" for k, v in zip(runs, [s.partition("=")[2] for s in args.run])),
        "",
        "| method | budget | seeds | FLOPs ratio | perplexity (geometric mean over seeds) | per seed "
        "| × reference (geometric mean) "
        "| t-interval over seeds (log scale) | chunk bootstrap of the geometric mean | per seed × reference [chunk bootstrap] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget']:.2f} | {r['seeds']} | {r['flops_ratio']:.3f} | {r['perplexity']:.2f} "
            f"| {r['ppl_per_seed']} | {r['ratio']:.3f} | {_fmt_ci(r['t_lo'], r['t_hi'])} "
            f"| {_fmt_ci(r['boot_lo'], r['boot_hi'])} | {r['ratio_per_seed']} |"
        )
    lines += ["", verdict]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
