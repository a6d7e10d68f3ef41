"""Sweep outputs: the CSV columns, the goal verdicts, ``pareto.png`` and the markdown summary.

The plot has three panels — accuracy vs executed FLOPs ratio, vs measured
speedup at batch 1, vs measured speedup at batch 16 — one line per method,
dense as a star and a dashed line. The title states the goal verdict (does
dynamic beat the best static method by >= 3 points at 25% FLOPs, and is its
speedup >= 0.85 x ideal), so someone who reads nothing else sees it.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Column order of sweep.csv (the first ten are the required columns).
COLUMNS = [
    "method", "budget", "flops_ratio", "accuracy", "latency_ms_bs1", "latency_ms_bs16",
    "speedup_bs1", "speedup_bs16", "params", "disk_bytes",
    "loss", "flops_ratio_p5", "flops_ratio_p95", "ideal_speedup_bs1", "ideal_speedup_bs16",
    "ratio_to_ideal_bs1", "ratio_to_ideal_bs16", "nonzero_flops_ratio", "sparsity", "finetune_steps",
    "structure", "seconds", "notes",
]  # fmt: skip

METHODS = ("dense", "dynamic", "magnitude", "ln_structured", "iterative", "static_gates", "search", "random")
# Static methods the goal compares dynamic against (magnitude saves no executed FLOPs, see notes).
STATIC_STRUCTURED = ("ln_structured", "iterative", "static_gates", "search", "random")
GOAL_MARGIN_PT = 3.0
GOAL_RATIO = 0.85
GOAL_BUDGET = 0.25

STYLE = {
    "dense": dict(color="black", marker="*"),
    "dynamic": dict(color="tab:red", marker="o", linewidth=2.5),
    "magnitude": dict(color="tab:gray", marker="x", linestyle=":"),
    "ln_structured": dict(color="tab:blue", marker="s"),
    "iterative": dict(color="tab:cyan", marker="D"),
    "static_gates": dict(color="tab:green", marker="^"),
    "search": dict(color="tab:purple", marker="v"),
    "random": dict(color="tab:olive", marker="P", linestyle="--"),
}


@dataclass
class Verdict:
    """The issue's two goals at one budget (None where a number is missing)."""

    budget: float
    dynamic_acc: float | None
    best_static: str | None
    best_static_acc: float | None
    margin_pt: float | None
    ratio_bs1: float | None
    ratio_bs16: float | None

    @property
    def accuracy_met(self) -> bool | None:
        return None if self.margin_pt is None else self.margin_pt >= GOAL_MARGIN_PT

    @property
    def speed_met(self) -> bool | None:
        if self.ratio_bs1 is None or self.ratio_bs16 is None:
            return None
        return min(self.ratio_bs1, self.ratio_bs16) >= GOAL_RATIO

    def lines(self) -> list[str]:
        def word(x: bool | None) -> str:
            return "n/a" if x is None else ("MET" if x else "MISSED")

        out = []
        if self.margin_pt is None:
            out.append(f"accuracy goal at {self.budget:.0%} FLOPs: n/a (missing dynamic or static points)")
        else:
            out.append(
                f"accuracy at {self.budget:.0%} FLOPs: dynamic {self.dynamic_acc:.2%} vs best static "
                f"{self.best_static} {self.best_static_acc:.2%} -> {self.margin_pt:+.2f} pt "
                f"(goal >= +{GOAL_MARGIN_PT:.0f}: {word(self.accuracy_met)})"
            )
        if self.speed_met is None:
            out.append("speed goal: n/a (no dynamic latency)")
        else:
            out.append(
                f"dynamic speedup / ideal at {self.budget:.0%}: bs1 {self.ratio_bs1:.2f}, bs16 {self.ratio_bs16:.2f} "
                f"(goal >= {GOAL_RATIO}: {word(self.speed_met)})"
            )
        return out


def _num(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value in (None, ""):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _at_budget(rows: Sequence[dict[str, Any]], method: str, budget: float) -> dict[str, Any] | None:
    for r in rows:
        b = _num(r, "budget")
        if r.get("method") == method and b is not None and abs(b - budget) < 1e-6:
            return r
    return None


def verdict(rows: Sequence[dict[str, Any]], budget: float | None = None) -> Verdict:
    """The goals at ``budget`` (default: 25%, or the lowest dynamic budget if 25% was not swept)."""
    if budget is None:
        dyn_budgets = sorted(b for r in rows if r.get("method") == "dynamic" and (b := _num(r, "budget")))
        budget = (
            GOAL_BUDGET if not dyn_budgets or _at_budget(rows, "dynamic", GOAL_BUDGET) else dyn_budgets[0]
        )
    dyn = _at_budget(rows, "dynamic", budget)
    statics = [(m, _at_budget(rows, m, budget)) for m in STATIC_STRUCTURED]
    statics = [(m, r) for m, r in statics if r is not None and _num(r, "accuracy") is not None]
    best = max(statics, key=lambda mr: _num(mr[1], "accuracy") or 0.0, default=None)
    dyn_acc = _num(dyn, "accuracy") if dyn else None
    best_acc = _num(best[1], "accuracy") if best else None
    margin = None if dyn_acc is None or best_acc is None else 100.0 * (dyn_acc - best_acc)
    return Verdict(
        budget=budget,
        dynamic_acc=dyn_acc,
        best_static=best[0] if best else None,
        best_static_acc=best_acc,
        margin_pt=margin,
        ratio_bs1=_num(dyn, "ratio_to_ideal_bs1") if dyn else None,
        ratio_bs16=_num(dyn, "ratio_to_ideal_bs16") if dyn else None,
    )


def plot_pareto(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Write the three-panel Pareto plot (see module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("flops_ratio", "executed FLOPs / dense FLOPs (lower = cheaper)"),
        ("speedup_bs1", "measured speedup vs dense, batch 1 (higher = faster)"),
        ("speedup_bs16", "measured speedup vs dense, batch 16 (higher = faster)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(19, 6.6), sharey=True)
    dense = next((r for r in rows if r.get("method") == "dense"), None)
    dense_acc = _num(dense, "accuracy") if dense else None
    v = verdict(rows)
    for ax, (key, label) in zip(axes, panels):
        for method in METHODS:
            pts = [(_num(r, key), _num(r, "accuracy")) for r in rows if r.get("method") == method]
            pts = sorted((x, y) for x, y in pts if x is not None and y is not None)
            if not pts:
                continue
            style = dict(STYLE.get(method, {}))
            xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
            if method == "dense":
                ax.plot(xs, ys, linestyle="none", markersize=16, label="dense", **style)
            else:
                ax.plot(xs, ys, label=method, markersize=7, **style)
        if key.startswith("speedup"):  # what dynamic's FLOPs promise (goal: measured >= 0.85 x this)
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
            ax.axvline(v.budget, color="tab:red", linestyle=":", linewidth=1)
            if v.best_static_acc is not None:
                target = 100 * v.best_static_acc + GOAL_MARGIN_PT
                ax.plot([v.budget - 0.04, v.budget + 0.04], [target] * 2, color="tab:red", linewidth=2.5)
                ax.annotate(
                    f"goal: best static ({v.best_static}) + {GOAL_MARGIN_PT:.0f} pt",
                    xy=(v.budget + 0.045, target), fontsize=8, color="tab:red", va="center",
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
    axes[0].set_ylabel("accuracy (%)")
    head = title + "\n" if title else ""
    fig.suptitle(head + "\n".join(v.lines()), fontsize=11)
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


def _fmt(value: Any, key: str) -> str:
    x = _num({"v": value}, "v")
    if x is None:
        return "" if value in (None, "") else str(value)
    if key in ("accuracy", "sparsity"):
        return f"{100 * x:.2f}"
    if key in ("params", "disk_bytes"):
        return f"{x / 1e6:.2f}M" if key == "params" else f"{x / 2**20:.1f}MiB"
    if key.startswith("latency"):
        return f"{x:.2f}"
    return f"{x:.3f}"


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(k), k) for k in keys) + " |")
    return "\n".join(out)


SUMMARY_KEYS = [
    "method", "budget", "flops_ratio", "accuracy", "latency_ms_bs1", "latency_ms_bs16",
    "speedup_bs1", "speedup_bs16", "ratio_to_ideal_bs1", "ratio_to_ideal_bs16", "params", "disk_bytes",
]  # fmt: skip


def write_summary(
    rows: Sequence[dict[str, Any]], path: str | os.PathLike, header: str, notes: Sequence[str] = ()
) -> Path:
    """Markdown: header (config, machine), goal verdicts, the table, notes per method."""
    v = verdict(rows)
    lines = [header, "", "## Goals", ""] + [f"- {line}" for line in v.lines()]
    lines += ["", "## Results (test split)", "", markdown_table(rows, SUMMARY_KEYS), ""]
    lines += [
        "accuracy in %, latency in ms (median of interleaved runs, same process as dense), "
        "speedup = dense ms / method ms, ratio_to_ideal = speedup / (dense FLOPs / executed FLOPs).",
        "",
    ]
    per_row = [f"- `{r['method']}` @ {r['budget']}: {r['notes']}" for r in rows if r.get("notes")]
    if per_row:
        lines += ["## Notes per point", "", *per_row, ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    out = Path(path)
    out.write_text("\n".join(lines))
    return out
