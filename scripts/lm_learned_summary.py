"""Learned-router perplexity over seeds: `dynprune eval perplexity` output dirs -> summary.md / .csv.

    python scripts/lm_learned_summary.py --run seed0=DIR0 --run seed1=DIR1 --run seed2=DIR2 \
        [--reference DIR | --reference seed0=REF0 --reference seed1=REF1 ...] [--original DIR] \
        [--goal-budget 0.6 --goal-ratio 1.05] --out results/smollm2_kjv/learned_quick

Each DIR is one `dynprune eval perplexity --method dense ... learned --gates RUN/gated/gates`
output (rows.jsonl: per-chunk NLL sums of every row; the same test chunks in every DIR). The
reference is the `dense` row of `--reference DIR` (default: of the first run), e.g. the original
dense model, shared by every seed; or, with `--reference NAME=DIR` for every run, each seed's own
reference (e.g. the dense model that seed fine-tuned: `--model RUN/dense --method dense griffin`),
and the other methods of those DIRs (griffin on each seed's fine-tuned dense) are summarised over
seeds like `learned`, as is the run's own dense row when it differs from its reference (after
`lm.tune_base`: the tuned base at budget 1.0). Every ratio is paired on chunks against the seed's
reference. `--original DIR`: the dense row of DIR (the original model) is listed for context,
× each seed's reference.

Per budget of the `learned` rows: per-seed perplexity, FLOPs ratio and × reference with its 95 %
chunk-bootstrap interval; over seeds the geometric mean × reference (ratios of perplexities are
averaged on the log scale: they span orders of magnitude when a router fails) with two intervals —
a 95 % t-interval over seeds on log(× reference), exponentiated (how much retraining moves it), and
a chunk bootstrap of the seeds' geometric mean (the same resampled chunks for every seed and the
reference: how much the test text moves it). A goal
`× reference <= goal_ratio at goal_budget` is "met" only when both intervals lie below it, "not
met" when both lie above it, otherwise "not established". With a shared reference, other methods
found in the first run (e.g. griffin, deterministic) are listed beside it with their
chunk-bootstrap interval.
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


def _arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    nll = np.stack([np.asarray(r["chunk_nll"], dtype=float) for r in rows])
    return nll, np.stack([np.asarray(r["chunk_tokens"], dtype=float) for r in rows])


def _over_seeds(method: str, budget: float, got: list[tuple[str, dict]], refs: dict[str, dict], idx) -> dict:
    """One table row: ``got`` = (seed, row) pairs, each against ``refs[seed]`` (paired on chunks)."""
    nll, tok = _arrays([r for _, r in got])  # (S, N)
    ref_nll, ref_tok = _arrays([refs[s] for s, _ in got])
    if nll.shape[1] != ref_nll.shape[1]:
        raise SystemExit("every run must score the same chunks as the reference")
    seed_ppl = ppl(nll, tok)  # (S,)
    ratios = seed_ppl / ppl(ref_nll, ref_tok)
    per_seed_boot = ppl(nll[:, idx], tok[:, idx]) / ppl(ref_nll[:, idx], ref_tok[:, idx])  # (S, R)
    logs = np.log(ratios)
    mean_boot = np.exp(np.log(per_seed_boot).mean(0))  # geometric mean over seeds, per resample
    boot_lo, boot_hi = np.quantile(mean_boot, [0.025, 0.975]).tolist()
    t_lo = t_hi = None
    if len(got) >= 2:
        _, lo, hi = t_interval(logs)
        t_lo, t_hi = float(np.exp(lo)), float(np.exp(hi))
    seed_ci = [np.quantile(per_seed_boot[i], [0.025, 0.975]) for i in range(len(got))]
    return {
        "method": method,
        "budget": budget,
        "seeds": len(got),
        "flops_ratio": float(np.mean([r["flops_ratio"] for _, r in got])),
        "perplexity": float(np.exp(np.log(seed_ppl).mean())),
        "ppl_per_seed": " / ".join(f"{p:.2f}" for p in seed_ppl),
        "ratio": float(np.exp(logs.mean())),
        "ratio_per_seed": " / ".join(f"{x:.3f} [{lo:.3f}, {hi:.3f}]" for x, (lo, hi) in zip(ratios, seed_ci)),
        "t_lo": t_lo,
        "t_hi": t_hi,
        "boot_lo": boot_lo,
        "boot_hi": boot_hi,
    }


def _verdict(row: dict, goal_budget: float, goal_ratio: float) -> str:
    highs = [row["boot_hi"]] + ([row["t_hi"]] if row["t_hi"] is not None else [])
    lows = [row["boot_lo"]] + ([row["t_lo"]] if row["t_lo"] is not None else [])
    if row["seeds"] < 3:
        state = "not established (fewer than 3 seeds: an anecdote)"
    elif max(highs) <= goal_ratio:
        state = "met"
    elif min(lows) > goal_ratio:
        state = "not met"
    else:
        state = "not established"
    t = "n/a" if row["t_lo"] is None else f"[{row['t_lo']:.3f}, {row['t_hi']:.3f}]"
    return (
        f"goal × reference <= {goal_ratio} at budget {goal_budget}: {state} "
        f"(geometric mean {row['ratio']:.3f}, t-interval {t}, chunk bootstrap "
        f"[{row['boot_lo']:.3f}, {row['boot_hi']:.3f}], {row['seeds']} seed(s))"
    )


def summarise(
    runs: dict[str, list[dict]],
    references: dict[str, dict] | dict,
    goal_budget: float,
    goal_ratio: float,
    seed: int = 0,
    reference_rows: dict[str, list[dict]] | None = None,
    original: dict | None = None,
):
    """Rows of the summary table (dicts) and the goal verdict line.

    ``references``: one dense row shared by every run, or {run name: its own dense row};
    ``reference_rows``: every row of each run's reference dir (its other methods are summarised over
    seeds); ``original``: a dense row listed for context against each seed's reference."""
    names = list(runs)
    refs = references if set(references) == set(names) else {s: references for s in names}
    per_seed = reference_rows is not None
    n = len(refs[names[0]]["chunk_nll"])
    idx = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    ref = _over_seeds("reference dense", 1.0, [(s, refs[s]) for s in names], refs, idx)
    ref_nll, ref_tok = _arrays([refs[s] for s in names])
    ref["perplexity"] = float(np.exp(np.log(ppl(ref_nll, ref_tok)).mean()))
    ref["ppl_per_seed"] = " / ".join(f"{p:.2f}" for p in ppl(ref_nll, ref_tok)) if per_seed else ""
    ref.update(seeds="-" if not per_seed else len(names), ratio_per_seed="", t_lo=None, t_hi=None)
    out: list[dict] = [ref]
    verdict = f"no learned row at budget {goal_budget}"
    pools = {s: [r for r in runs[s] if r["method"] == "learned"] for s in names}
    if per_seed:
        for s in names:
            own = next((r for r in runs[s] if r["method"] == "dense"), None)
            if own is not None and own["chunk_nll"] != refs[s]["chunk_nll"]:
                pools[s].append({**own, "method": "run base at 1.0"})
            pools[s] += [r for r in reference_rows[s] if r["method"] != "dense"]  # type: ignore[index]
    if original is not None:
        for s in names:
            pools[s].append({**original, "method": "original dense"})
    keys = sorted({(r["method"], r["budget"]) for rows in pools.values() for r in rows})
    order = {"original dense": 0, "run base at 1.0": 1, "learned": 2}
    for method, b in sorted(keys, key=lambda k: (order.get(k[0], 3), k)):
        got = [(s, r) for s in names for r in pools[s] if (r["method"], r["budget"]) == (method, b)]
        row = _over_seeds(method, b, got, refs, idx)
        out.append(row)
        if method == "learned" and abs(b - goal_budget) < 1e-9:
            verdict = _verdict(row, goal_budget, goal_ratio)
    if not per_seed:
        for r in runs[names[0]]:
            if r["method"] in ("dense", "learned"):
                continue
            row = _over_seeds(r["method"], r["budget"], [(names[0], r)], refs, idx)
            row.update(seeds="deterministic", ppl_per_seed="", ratio_per_seed="")
            out.append(row)
    return out, verdict


def _no_dense(where: str) -> dict:
    raise SystemExit(f"{where}: no dense row (the reference)")


def _fmt_ci(lo: float | None, hi: float | None) -> str:
    return "" if lo is None else f"[{lo:.3f}, {hi:.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME=DIR, one per seed")
    p.add_argument(
        "--reference",
        action="append",
        default=None,
        help="DIR whose dense row is every run's reference, or NAME=DIR once per run (each seed its own)",
    )
    p.add_argument("--reference-name", default=None, help="how the table names the reference")
    p.add_argument("--original", type=Path, default=None, help="DIR whose dense row is listed for context")
    p.add_argument("--goal-budget", type=float, default=0.6)
    p.add_argument("--goal-ratio", type=float, default=1.05)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, _, path = spec.partition("=")
        runs[name] = read_rows(Path(path))
    dense = lambda rows, where: next((r for r in rows if r["method"] == "dense"), None) or _no_dense(where)  # noqa: E731
    reference_rows = None
    if args.reference and all("=" in spec for spec in args.reference):
        given = dict(spec.partition("=")[::2] for spec in args.reference)
        if set(given) != set(runs):
            raise SystemExit(
                f"--reference NAME=DIR must name every run once: runs {sorted(runs)}, got {sorted(given)}"
            )
        reference_rows = {name: read_rows(Path(given[name])) for name in runs}
        references = {name: dense(rows, given[name]) for name, rows in reference_rows.items()}
    elif args.reference:
        if len(args.reference) != 1:
            raise SystemExit("give one --reference DIR, or NAME=DIR for every run")
        references = dense(read_rows(Path(args.reference[0])), args.reference[0])
    else:
        references = dense(next(iter(runs.values())), "the first run")
        for name, rows in runs.items():  # a run's own dense row must be the reference's
            own = next((r for r in rows if r["method"] == "dense"), None)
            if own is not None and own["chunk_nll"] != references["chunk_nll"]:
                raise SystemExit(f"run {name}: its dense row differs from the first run's (another model?)")
    original = dense(read_rows(args.original), str(args.original)) if args.original else None
    if args.reference_name is None:
        args.reference_name = (
            "each run's own --reference dense row" if reference_rows else "dense (first run's dense row)"
        )
    rows, verdict = summarise(
        runs, references, args.goal_budget, args.goal_ratio, reference_rows=reference_rows, original=original
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with open(args.out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"Reference: {args.reference_name}, perplexity {rows[0]['perplexity']:.2f}"
        + (
            f" (geometric mean over seeds; per seed {rows[0]['ppl_per_seed']})"
            if rows[0]["ppl_per_seed"]
            else ""
        )
        + ". Runs: "
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
    if reference_rows is not None:
        lines[0] += ". References: " + ", ".join(args.reference)
    lines += ["", verdict]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
