"""Sweep outputs: the CSV columns, ``pareto.png`` and the markdown summary.

The plot has up to three panels — accuracy vs executed FLOPs ratio, vs measured
speedup at batch 1, vs measured speedup at batch 16 (each speed panel only when some
method was timed) — one line per method
(mean over its seeds, error bars ± one std across seeds), dense as a star and
a dashed line. The title carries the goal lines of
:mod:`dynprune.eval.sweep_stats` (estimate, paired bootstrap interval, verdict
where the data support one), so someone who reads nothing else sees them.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Column order of sweep.csv, one row per (method, budget, seed) (the first ten are the required columns).
COLUMNS = [
    "method", "budget", "flops_ratio", "accuracy", "latency_ms_bs1", "latency_ms_bs16",
    "speedup_bs1", "speedup_bs16", "params", "disk_bytes",
    "seed", "loss", "flops_ratio_p5", "flops_ratio_p50", "flops_ratio_p95", "ideal_speedup_bs1", "ideal_speedup_bs16",
    "ratio_to_ideal_bs1", "ratio_to_ideal_bs16", "nonzero_flops_ratio", "sparsity", "finetune_steps",
    "structure", "seconds", "notes",
]  # fmt: skip

METHODS = (
    "dense", "dynamic", "magnitude", "ln_structured", "iterative", "static_gates", "search", "random",
    "early_exit", "static_early_exit", "static_gates_ft", "static_cascade", "static_cascade_ft",
)  # fmt: skip

STYLE = {
    "dense": dict(color="black", marker="*"),
    "dynamic": dict(color="tab:red", marker="o", linewidth=2.5),
    "magnitude": dict(color="tab:gray", marker="x", linestyle=":"),
    "ln_structured": dict(color="tab:blue", marker="s"),
    "iterative": dict(color="tab:cyan", marker="D"),
    "static_gates": dict(color="tab:green", marker="^"),
    "search": dict(color="tab:purple", marker="v"),
    "random": dict(color="tab:olive", marker="P", linestyle="--"),
    "early_exit": dict(color="tab:orange", marker="X", linewidth=2.0),
    "static_early_exit": dict(color="tab:brown", marker="h", linewidth=2.0),
    "static_gates_ft": dict(color="tab:green", marker="^", linestyle="--"),
    "static_cascade": dict(color="tab:pink", marker="d", linewidth=2.0),
    "static_cascade_ft": dict(color="tab:pink", marker="d", linestyle="--", linewidth=2.0),
}


def _num(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def plot_pareto(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    goal_lines: Sequence[str] = (),
    goal: tuple[float, str, float] | None = None,
) -> Path:
    """Write the Pareto plot (see module docstring; a speed panel only when some method was timed).
    ``rows``: one per (method, budget), seeds averaged (``accuracy_std`` for the error bars); ``goal``:
    (budget, best static method, its accuracy) to draw the accuracy goal's target mark. Returns the
    path written."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dynprune.eval.sweep_stats import GOAL_MARGIN_PT

    panels = [("flops_ratio", "executed mean FLOPs / dense FLOPs (lower = cheaper)")] + [
        (key, label)
        for key, label in (
            ("speedup_bs1", "measured speedup vs dense, batch 1 (higher = faster)"),
            ("speedup_bs16", "measured speedup vs dense, batch 16 (higher = faster)"),
        )
        if any(_num(r, key) is not None for r in rows if r.get("method") != "dense")
    ]
    width = max(10.0, 6.3 * len(panels))
    heading = []
    for line in ([title] if title else []) + list(goal_lines):  # wrapped: ~14 characters per inch at size 9
        heading += textwrap.wrap(line, int(14 * width), subsequent_indent="    ")
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width, 6.6 + 0.16 * len(heading)), sharey=True, squeeze=False
    )
    axes = axes[0]
    dense = next((r for r in rows if r.get("method") == "dense"), None)
    dense_acc = _num(dense, "accuracy") if dense else None
    for ax, (key, label) in zip(axes, panels):
        for method in METHODS:
            pts = [
                (_num(r, key), _num(r, "accuracy"), _num(r, "accuracy_std") or 0.0)
                for r in rows
                if r.get("method") == method
            ]
            pts = sorted((x, y, e) for x, y, e in pts if x is not None and y is not None)
            if not pts:
                continue
            style = dict(STYLE.get(method, {}))
            xs, ys, es = [p[0] for p in pts], [100 * p[1] for p in pts], [100 * p[2] for p in pts]
            if method == "dense":
                ax.plot(xs, ys, linestyle="none", markersize=16, label="dense", **style)
            else:
                ax.errorbar(xs, ys, yerr=es, label=method, markersize=7, capsize=3, **style)
        if key.startswith("speedup"):  # what dynamic's FLOPs promise
            ideal = sorted(
                (_num(r, "ideal_" + key), _num(r, "accuracy")) for r in rows if r.get("method") == "dynamic"
            )
            ideal = [(x, y) for x, y in ideal if x is not None and y is not None]
            if ideal:
                (line,) = ax.plot([x for x, _ in ideal], [100 * y for _, y in ideal], color="tab:red",
                                  linestyle=":", marker="o", markerfacecolor="none")  # fmt: skip
                ax.legend(
                    [line],
                    ["dynamic if speedup = ideal (dense FLOPs / executed FLOPs)"],
                    loc="lower right",
                    fontsize=8,
                )
            ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        if dense_acc is not None:
            ax.axhline(100 * dense_acc, color="black", linestyle="--", linewidth=0.8)
        if key == "flops_ratio":
            if goal is not None:
                budget, static, static_acc = goal
                ax.axvline(budget, color="tab:red", linestyle=":", linewidth=1)
                target = 100 * static_acc + GOAL_MARGIN_PT
                ax.plot([budget - 0.04, budget + 0.04], [target] * 2, color="tab:red", linewidth=2.5)
                ax.annotate(
                    f"goal: best static ({static}) + {GOAL_MARGIN_PT:g} pt",
                    xy=(budget + 0.045, target), fontsize=8, color="tab:red", va="center",
                )  # fmt: skip
            ax.set_xlim(0, 1.08)
            mag = [r for r in rows if r.get("method") == "magnitude"]
            accs = [100 * a for r in rows if (a := _num(r, "accuracy")) is not None]
            if mag and accs:
                low = 100 * min(_num(r, "accuracy") or 1 for r in mag)
                text_y = min(accs) + 0.3 * (max(accs) - min(accs))
                ax.annotate(
                    "magnitude (unstructured):\nexecuted FLOPs stay 1.0\non dense hardware",
                    xy=(1.0, low), xytext=(0.62, text_y), fontsize=8, color="tab:gray",
                    arrowprops=dict(arrowstyle="->", color="tab:gray"),
                )  # fmt: skip
            ax.legend(loc="upper left", fontsize=9)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean ± std over seeds")
    fig.suptitle("\n".join(heading), fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def machine_description() -> str:
    """CPU, cores, torch and thread count, relevant env vars (from dynprune.eval.timing.runtime_env)."""
    from dynprune.eval.timing import runtime_env

    env = runtime_env()
    extra = ", ".join(f"{k}={v}" for k, v in env.items() if k.isupper() and v != "(unset)")
    return (
        f"{env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['torch']} with "
        f"{env['torch_threads']} threads, fp32, Python {env['python']}, {platform.system()}"
        + (f"; {extra}" if extra else "")
    )


def _fmt(value: Any, key: str, row: dict[str, Any] | None = None) -> str:
    x = _num({"v": value}, "v")
    if x is None:
        return "" if value in (None, "") else str(value)
    if key == "accuracy" and row is not None and (std := _num(row, "accuracy_std")) is not None:
        return f"{100 * x:.2f} ± {100 * std:.2f}"
    if key in ("accuracy", "sparsity"):
        return f"{100 * x:.2f}"
    if key in ("params", "disk_bytes"):
        return f"{x / 1e6:.2f}M" if key == "params" else f"{x / 2**20:.1f}MiB"
    if key.startswith("latency"):
        return f"{x:.2f}"
    if key == "n_seeds":
        return f"{x:.0f}"
    if key == "budget":
        return f"{x:g}"
    return f"{x:.3f}"


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k), k, r) for k in keys) + " |")
    return "\n".join(out)


SUMMARY_KEYS = [
    "method", "budget", "n_seeds", "flops_ratio", "flops_ratio_p5", "flops_ratio_p50", "flops_ratio_p95", "accuracy",
    "latency_ms_bs1", "latency_ms_bs16", "speedup_bs1", "speedup_bs16", "ratio_to_ideal_bs1",
    "ratio_to_ideal_bs16", "params", "disk_bytes",
]  # fmt: skip


def write_summary(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    header: str,
    goal_lines: Sequence[str],
    notes: Sequence[str] = (),
) -> Path:
    """Markdown: header (config, machine), goal lines, the table (seeds averaged), notes per point."""
    lines = [header, "", "## Goals", ""] + [f"- {line}" for line in goal_lines]
    lines += [
        "",
        "## Results (evaluation split, mean over seeds)",
        "",
        markdown_table(rows, SUMMARY_KEYS),
        "",
    ]
    lines += [
        "accuracy in % (mean ± sample std over seeds where n_seeds > 1), flops_ratio = mean executed FLOPs / "
        "dense FLOPs per input (p5/p50/p95 of the per-input ratio), latency in ms per input at batch 1 (mean over "
        "the timing inputs) and per batch of 16 (median of interleaved runs, same process as dense), "
        "speedup = dense ms / method ms, ratio_to_ideal = speedup / (dense FLOPs / executed FLOPs).",
        "",
    ]
    per_row = [f"- `{r['method']}` @ {r['budget']:g}: {r['notes']}" for r in rows if r.get("notes")]
    if per_row:
        lines += ["## Notes per point (first seed)", "", *per_row, ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    out = Path(path)
    out.write_text("\n".join(lines))
    return out
