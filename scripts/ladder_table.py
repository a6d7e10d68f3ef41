"""The ablation ladder's table (``scripts/ablation_ladder.py``): rows from ``ladder.csv`` to
``ladder.md`` — accuracy mean ± std over seeds per variant and budget, and each variant paired with
the static control on the same seed (mean and 95 % t-interval of the differences)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable
from pathlib import Path

from dynprune.eval.sweep_stats import t_interval


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows, the first of any duplicate (variant, seed, budget) only."""
    rows, seen = [], set()
    for r in csv.DictReader(path.open()) if path.is_file() else []:
        key = (r["variant"], r["seed"], r["budget"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    return rows


def write_table(rows: list[dict], path: Path, order: list[str], describe: Callable[[str], str]) -> None:
    """Markdown: per variant, accuracy mean +- std over seeds at every budget (and the seeds)."""
    by: dict[tuple[str, float], list[float]] = {}
    hamming: dict[tuple[str, float], list[float]] = {}
    commits: dict[str, set[str]] = {}
    flops: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        if r.get("budget_kind") == "mean":
            flops.setdefault((r["variant"], float(r["budget"])), []).append(
                100 * float(r["flops_ratio_mean"])
            )
        key = (r["variant"], float(r["budget"]))
        by.setdefault(key, []).append(100 * float(r["accuracy"]))
        if r["hamming_frac"] not in ("", None):
            hamming.setdefault(key, []).append(float(r["hamming_frac"]))
        commits.setdefault(r["variant"], set()).add(r["commit"])
    budgets = sorted({b for _, b in by})
    variants = [v for v in order if any(k[0] == v for k in by)]
    variants += sorted({k[0] for k in by} - set(variants))
    head = (
        "| variant | seeds | "
        + " | ".join(f"acc @ {b:g}" for b in budgets)
        + " | Hamming/units @ 0.5 | commit |"
    )
    lines = [
        "# Ablation ladder (quick recipe, test split)",
        "",
        "Accuracy in %, mean ± std over seeds (sample std); n = test examples per run.",
        "Produced by `scripts/ablation_ladder.py`; raw rows in `ladder.csv` (machine named there).",
        "",
        head,
        "|" + "---|" * (len(budgets) + 4),
    ]
    for v in variants:
        cells, n_seeds = [], 0
        for b in budgets:
            acc = by.get((v, b), [])
            n_seeds = max(n_seeds, len(acc))
            if not acc:
                cells.append("")
            elif len(acc) == 1:
                cells.append(f"{acc[0]:.2f}")
            else:
                cells.append(f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f}")
        h = hamming.get((v, 0.5), [])
        hcell = f"{statistics.mean(h):.3f}" if h else ""
        desc = describe(v)
        lines.append(
            f"| {v}: {desc} | {n_seeds} | "
            + " | ".join(cells)
            + f" | {hcell} | {', '.join(sorted(commits[v]))} |"
        )
    if flops:
        lines += [
            "",
            "Mean-budget rows (trained with `gate.budget_mode=mean`, test at `MeanBudget(b)`): executed",
            "mean FLOPs % of dense per budget, mean ± std over seeds (the target is b; every other row",
            "is a cap per input, about b for every input):",
            "",
        ]
        for (v, b), f in sorted(flops.items()):
            cell = f"{f[0]:.2f}" if len(f) == 1 else f"{statistics.mean(f):.2f} ± {statistics.stdev(f):.2f}"
            lines.append(f"- {v} @ mean {b:g}: {cell} ({len(f)} seed{'s' if len(f) > 1 else ''})")
    lines += _paired_lines(rows, variants, budgets)
    path.write_text("\n".join(lines) + "\n")


def _paired_lines(rows: list[dict], variants: list[str], budgets: list[float]) -> list[str]:
    """Per variant: accuracy minus the static control's on the same seed (same dense teacher,
    same data split), mean and 95 % t-interval over seeds; no verdict when it contains 0."""
    acc = {(r["variant"], int(r["seed"]), float(r["budget"])): 100 * float(r["accuracy"]) for r in rows}
    out = [
        "",
        "## Paired with the static control (same seed, same teacher)",
        "",
        "Accuracy difference in points, mean [95 % t-interval] over the seeds both ran.",
        "A mean-budget row (`dynamic_mean`) is paired with the control's cap b: the same mean FLOPs",
        "target, not the same per-input cost (its executed mean FLOPs are listed above).",
        "",
        "| variant | " + " | ".join(f"Δ @ {b:g}" for b in budgets if b < 1) + " |",
        "|---|" + "---|" * sum(b < 1 for b in budgets),
    ]
    for v in variants:
        if v in ("static", "dense"):
            continue
        cells = []
        for b in (b for b in budgets if b < 1):
            seeds = sorted({k[1] for k in acc if k[0] == v and k[2] == b and ("static", k[1], b) in acc})
            diffs = [acc[(v, s, b)] - acc[("static", s, b)] for s in seeds]
            if len(diffs) < 2:
                cells.append(f"{diffs[0]:+.2f} (1 seed)" if diffs else "")
                continue
            m, lo, hi = t_interval(diffs)
            cells.append(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return out
