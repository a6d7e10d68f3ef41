"""The final report of a run: accuracy and executed FLOPs per budget, static control, adaptivity.

Writes OUTPUT_DIR/report/{results.csv, adaptivity.csv, summary.md, keep_rates.png}
(and a copy to ``evaluation.results_dir``), adds the evaluation to each stage's
metrics.json, and prints a one-screen summary.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from dynprune.train import checkpoint as ckpt
from dynprune.train.adaptivity import (
    group_stats,
    input_groups,
    mask_stats,
    plot_keep_rates,
    plot_training_curves,
)
from dynprune.train.evaluation import collect, summarize

import dynprune

# the goals (README) that accuracy differences are read against: (pair, budget) -> goal; a training
# run reports the differences as numbers only (one run = one seed: never a verdict)
ACCURACY_GOALS = {
    ("dense", 0.5): "goal >= -0.5 pt",
    ("dense", 0.25): "goal >= -2 pt",
    ("static", 0.25): "goal >= +1 pt",
}
ONE_SEED = (
    "one training run is one seed: indicative only, no verdict "
    "(>= 3 seeds and an interval: `dynprune sweep` with `seeds`, docs/evaluation.md)"
)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
        f"{gpu}, {platform.system()} {platform.release()}"
    )


def _read_metrics(path: Path) -> dict[str, Any]:
    f = path / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def final_report(ctx: Any, dense_dir: Path) -> dict[str, Any]:
    from dynprune.train.pipeline import load_classifier

    cfg, out = ctx.cfg, ctx.out
    split = cfg.evaluation.split
    loader = ctx.loader(split)
    dense_model = load_classifier(dense_dir, ctx.data.label_names).eval()
    dense_rec = collect(dense_model, loader)
    dense = summarize(dense_rec)
    del dense_model
    rows: list[dict[str, Any]] = [{"model": "dense", "router": "-", **dense, "budget": 1.0}]
    adapt: list[dict[str, Any]] = []
    curves: dict[str, dict[float, Any]] = {}
    for stage, router in (("gated", "dynamic"), ("static", "static")):
        if not (out / stage / "metrics.json").is_file():
            continue
        gated, _ = dynprune.load_gated_model(out / stage)
        curves[stage] = {}
        test_metrics = {}
        for b in cfg.evaluation.budgets:
            rec = collect(gated, loader, budget=b, keep_masks=True, execution=cfg.evaluation.execution)
            s = summarize(rec)
            row = {
                "model": stage,
                "router": router,
                "budget": b,
                **s,
                "delta_vs_dense_pt": 100 * (s["accuracy"] - dense["accuracy"]),
                "flops_rel_error": s["flops_ratio_mean"] / b - 1,
                "flops_abs_error": s["flops_ratio_mean"] - b,
                "never_over_budget": bool(s["flops_ratio_max"] <= b + 1e-9),
            }
            rows.append(row)
            test_metrics[str(b)] = row
            curves[stage][b] = rec
            adapt.append({"model": stage, "budget": b, "group": "all (mask stats)", **mask_stats(rec)})
            adapt += [
                {"model": stage, "budget": b, **g} for g in group_stats(rec, input_groups(rec, dense_rec))
            ]
        metrics = _read_metrics(out / stage)
        metrics[split] = test_metrics
        ckpt.write_json(out / stage / "metrics.json", metrics)
    dense_metrics = _read_metrics(dense_dir) if dense_dir.is_relative_to(out) else {}
    if dense_metrics:
        dense_metrics[split] = dense
        ckpt.write_json(dense_dir / "metrics.json", dense_metrics)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(report_dir / "results.csv", rows)
    _write_csv(report_dir / "adaptivity.csv", adapt)
    if curves:
        plot_keep_rates(curves, report_dir / "keep_rates.png")
    plot_training_curves(out / "logs" / "metrics.jsonl", report_dir / "training_curves.png")
    times = {
        s: _read_metrics(out / s).get("train", {}).get("train_seconds") for s in ("dense", "gated", "static")
    }
    goals = evaluate_goals(rows)
    summary = {
        "split": split,
        "n": dense["n"],
        "dense_accuracy": dense["accuracy"],
        "rows": rows,
        "adaptivity": adapt,
        "goals": goals,
        "accuracy_differences": accuracy_differences(rows),
        "train_seconds": times,
        "timings": ctx.timings,
        "machine": machine(),
    }
    ckpt.write_json(report_dir / "summary.json", summary)
    (report_dir / "summary.md").write_text(markdown(summary, cfg, ctx.data.source))
    if cfg.evaluation.results_dir:
        dest = Path(cfg.evaluation.results_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for f in report_dir.iterdir():
            shutil.copy2(f, dest / f.name)
    print(screen(summary, out))
    diffs = {f"diff_pt/{d['pair']}": d["diff_pt"] for d in summary["accuracy_differences"]}
    ctx.tracker.summary(
        {"dense_accuracy": dense["accuracy"], **{f"goal/{k}": v for k, v in goals.items()}, **diffs}
    )
    return summary


def evaluate_goals(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    """Verdicts a single run supports: executed FLOPs against their targets (None: not measured)."""
    gated = [r for r in rows if r["model"] == "gated"]
    return {
        "executed FLOPs within +-2% of target": (
            all(abs(r["flops_rel_error"]) <= 0.02 for r in gated) if gated else None
        )
    }


def accuracy_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gated (dynamic router) minus dense, and minus the static control at the same budget, in
    points, at every evaluated budget; numbers only, no verdicts."""
    by = {(r["model"], r["budget"]): r for r in rows}
    out = []
    for (model, budget), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if model != "gated":
            continue
        diffs = {"dense": r["delta_vs_dense_pt"]}  # the table's Δ vs dense column
        if ("static", budget) in by:
            diffs["static"] = 100 * (r["accuracy"] - by[("static", budget)]["accuracy"])
        for other, diff in diffs.items():
            goal = ACCURACY_GOALS.get((other, budget), "")
            out.append(
                {"pair": f"gated - {other} @{budget:g}", "budget": budget, "diff_pt": diff, "goal": goal}
            )
    return out


def _differences_lines(summary: dict[str, Any], prefix: str) -> list[str]:
    return [
        f"{prefix}{d['pair']}: {d['diff_pt']:+.2f} pt" + (f" ({d['goal']})" if d["goal"] else "")
        for d in summary["accuracy_differences"]
    ]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min"


def markdown(summary: dict[str, Any], cfg: Any, source: str) -> str:
    dense = summary["dense_accuracy"]
    lines = [
        f"# Training results ({summary['split']} split, {summary['n']} examples)",
        "",
        f"Data: {source}. Model: {cfg.model.path or 'packaged all-MiniLM-L6-v2'}.",
        f"Machine: {summary['machine']}.",
        "",
        "| model | router | budget | accuracy | Δ vs dense (pt) | executed FLOPs ratio: mean [min, max] | rel. error of mean | ≤ budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        if r["model"] == "dense":
            lines.append(f"| dense | - | 1.0 | {100 * dense:.2f} | 0 | 1.0 | - | - |")
            continue
        lines.append(
            f"| {r['model']} | {r['router']} | {r['budget']:g} | {100 * r['accuracy']:.2f} | "
            f"{r['delta_vs_dense_pt']:+.2f} | {r['flops_ratio_mean']:.4f} [{r['flops_ratio_min']:.4f}, "
            f"{r['flops_ratio_max']:.4f}] | {100 * r['flops_rel_error']:+.2f}% | {r['never_over_budget']} |"
        )
    lines += ["", "## Goals", ""]
    for name, ok in summary["goals"].items():
        lines.append(f"- {name}: {'met' if ok else ('not measured' if ok is None else 'MISSED')}")
    lines += ["", f"Accuracy differences ({ONE_SEED}):", ""]
    lines += _differences_lines(summary, "- ")
    t = summary["train_seconds"]
    lines += [
        "",
        "## Training time on this machine",
        "",
        f"- dense stage: {_fmt_time(t.get('dense'))}; gated stage: {_fmt_time(t.get('gated'))}; "
        f"static control: {_fmt_time(t.get('static'))} (optimiser steps only, without evaluation)",
        f"- whole run (this invocation, wall clock): {_fmt_time(summary['timings'].get('total_wall_s'))}",
        "",
        "Training curves (FLOPs ratio vs target, loss parts, multipliers, temperature, validation",
        "accuracy): training_curves.png.",
        "",
        *adaptivity_markdown(summary["adaptivity"]),
    ]
    return "\n".join(lines) + "\n"


def adaptivity_markdown(adapt: list[dict[str, Any]]) -> list[str]:
    """Mask statistics per model and budget, and FLOPs/allocation per input group."""
    masks = [a for a in adapt if a["group"].startswith("all (mask")]
    groups = [a for a in adapt if not a["group"].startswith("all")]
    if not masks:
        return []
    lines = [
        "## Input adaptivity (test split)",
        "",
        "Mean pairwise Hamming distance between per-example masks (over all heads, FFN slices and",
        "layers), the share of units whose keep rate is strictly between 0 and 1, distinct masks,",
        "and the mean number of kept layers / heads / FFN slices. Histograms: keep_rates.png.",
        "",
        "| model | budget | units | Hamming (units) | Hamming / units | adaptive units | distinct masks | layers | heads | slices |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in masks:
        lines.append(
            f"| {a['model']} | {a['budget']:g} | {a['units']} | {a['hamming_mean']:.2f} | {a['hamming_frac']:.4f} | "
            f"{a['adaptive_units_frac']:.2%} | {a['distinct_masks']} | {a['kept_layers_mean']:.2f} | "
            f"{a['kept_heads_mean']:.1f} | {a['kept_slices_mean']:.1f} |"
        )
    lines += [
        "",
        "Per input group (short/long: split at the median token count; easy/hard: the dense model's",
        "probability of the true label, top/bottom quartile). FLOPs ratio is per example, MFLOPs absolute.",
        "",
        "| model | budget | group | n | tokens | accuracy | FLOPs ratio | MFLOPs | layers | heads | slices |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in groups:
        lines.append(
            f"| {a['model']} | {a['budget']:g} | {a['group']} | {a['n']} | {a['tokens_mean']:.1f} | "
            f"{100 * a['accuracy']:.2f} | {a['flops_ratio_mean']:.4f} | {a['mflops_mean']:.1f} | "
            f"{a.get('kept_layers', float('nan')):.2f} | {a.get('kept_heads', float('nan')):.1f} | "
            f"{a.get('kept_slices', float('nan')):.1f} |"
        )
    return lines


def screen(summary: dict[str, Any], out: Path) -> str:
    dense = summary["dense_accuracy"]
    width = 78
    lines = ["=" * width, f" dynprune train: done ({summary['split']} split, n={summary['n']})", "-" * width]
    lines.append(
        f" {'model':8s} {'budget':>6s} {'acc %':>7s} {'Δ pt':>6s} {'FLOPs mean':>10s} {'max':>7s} {'err':>7s}"
    )
    for r in summary["rows"]:
        if r["model"] == "dense":
            lines.append(f" {'dense':8s} {1.0:6.2f} {100 * dense:7.2f} {0:6.2f} {1.0:10.4f}")
            continue
        lines.append(
            f" {r['model']:8s} {r['budget']:6.2f} {100 * r['accuracy']:7.2f} {r['delta_vs_dense_pt']:+6.2f} "
            f"{r['flops_ratio_mean']:10.4f} {r['flops_ratio_max']:7.4f} {100 * r['flops_rel_error']:+6.2f}%"
        )
    lines.append("-" * width)
    for name, ok in summary["goals"].items():
        lines.append(f" [{'ok' if ok else ('--' if ok is None else 'MISS')}] {name}")
    lines.append(" accuracy differences, one seed (indicative only, no verdict):")
    lines += _differences_lines(summary, "   ")
    t = summary["train_seconds"]
    lines.append(
        f" train time: dense {_fmt_time(t.get('dense'))}, gated {_fmt_time(t.get('gated'))}, "
        f"static {_fmt_time(t.get('static'))}; wall {_fmt_time(summary['timings'].get('total_wall_s'))}"
    )
    lines.append(f" outputs: {out}/{{dense,gated,static,report}}")
    lines.append("=" * width)
    return "\n".join(lines)
