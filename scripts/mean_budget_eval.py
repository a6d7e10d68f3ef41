"""Mean-budget comparison on one seed's quick-recipe runs (run under the CPU lock).

    python scripts/mean_budget_eval.py --run runs/mb/seed0 --mean-run runs/mb/seed0-mean \
        --seed 0 --out results/minilm_rt/mean_budget/rows.csv

Per target (0.25, 0.5 mean FLOPs), on the test split (calibrated on validation):
- ``dynamic_cap``: the cap-trained router at a cap per input = target (today's mode)
- ``static_cap``: the static learned-gates control at the same cap
- ``cascade``: the cap-trained router, cascade policy fitted for MeanBudget(target)
- ``mean_threshold``: the router trained with gate.budget_mode=mean, threshold policy
Appends one CSV row per (seed, method, target): accuracy, mean/p5/p50/p95 FLOPs ratio,
FLOPs by length quartile and by the dense model's confidence quartile.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from dynprune.train.config import DataConfig
from dynprune.train.data import Collator, encode, eval_batches, load_task_data
from dynprune.train.evaluation import collect

import dynprune
from dynprune.calibration_fit import fit

TARGETS = (0.25, 0.5)


def quartile_means(key: np.ndarray, value: np.ndarray) -> list[float]:
    """Mean of ``value`` in each quartile of ``key`` (lowest first)."""
    edges = np.quantile(key, [0.25, 0.5, 0.75])
    bins = np.searchsorted(edges, key, side="right")
    return [float(value[bins == q].mean()) if (bins == q).any() else float("nan") for q in range(4)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--mean-run", type=Path, default=None)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--parts", nargs="+", choices=("cap", "mean"), default=["cap", "mean"])
    p.add_argument("--limit", type=int, default=None, help="first N examples per split (smoke test)")
    args = p.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    cfg = yaml.safe_load((args.run / "config.yaml").read_text())
    gate = cfg.get("gate") or {}
    trained = (float(gate.get("budget_min", 0.2)), float(gate.get("budget_max", 0.8)))
    dense_dir = Path((cfg.get("model") or {}).get("teacher_path") or args.run / "dense")
    tok = transformers.AutoTokenizer.from_pretrained(dense_dir)
    data = load_task_data(DataConfig(**cfg["data"]))
    ex = encode(data, tok, cfg["data"]["max_length"])
    collate = Collator(tok.pad_token_id, getattr(tok, "padding_side", "right"))

    def batches(split: str) -> list:
        e = ex[split][: args.limit]
        return [collate([e[i] for i in b]) for b in eval_batches(e, args.batch_size)]

    val, test = batches("validation"), batches("test")
    dense = transformers.AutoModelForSequenceClassification.from_pretrained(dense_dir).eval()
    dense_rec = collect(dense, test)
    dense_conf = dense_rec.probs.max(-1)
    rows = []

    def record(method: str, target: float, rec, extra: dict | None = None) -> None:
        r = rec.flops_ratio
        row = {
            "seed": args.seed,
            "method": method,
            "target": target,
            "accuracy": float((rec.preds == rec.labels).mean()),
            "flops_ratio_mean": float(r.mean()),
            "flops_ratio_p5": float(np.percentile(r, 5)),
            "flops_ratio_p50": float(np.percentile(r, 50)),
            "flops_ratio_p95": float(np.percentile(r, 95)),
            "flops_by_length_q1_q4": json.dumps([round(v, 4) for v in quartile_means(rec.lengths, r)]),
            "flops_by_dense_conf_q1_q4": json.dumps([round(v, 4) for v in quartile_means(dense_conf, r)]),
            "n_test": len(r),
            **(extra or {}),
        }
        rows.append(row)
        print(row, flush=True)

    rows.append({"seed": args.seed, "method": "dense", "target": 1.0,
                 "accuracy": float((dense_rec.preds == dense_rec.labels).mean()), "flops_ratio_mean": 1.0})  # fmt: skip
    for name, sub in (("dynamic_cap", "gated"), ("static_cap", "static")):
        if "cap" not in args.parts or not (args.run / sub / "gates").is_dir():
            continue
        gated, _ = dynprune.load_gated_model(args.run / sub)
        for t in TARGETS:
            record(name, t, collect(gated, test, budget=t))
        if name == "dynamic_cap":
            for t in TARGETS:
                entry = fit(gated, val, dynprune.MeanBudget(t), policy="cascade", trained=trained)
                gated.calibration.add(entry)
                pol = entry.policy
                record("cascade", t, collect(gated, test, budget=dynprune.MeanBudget(t)),
                       {"policy": json.dumps(pol.__dict__), "val_flops": entry.fitted["flops_ratio_mean"],
                        "val_accuracy": entry.fitted["accuracy"]})  # fmt: skip
    if args.mean_run is not None and "mean" in args.parts:
        gated, _ = dynprune.load_gated_model(args.mean_run / "gated")
        for t in TARGETS:
            entry = fit(gated, val, dynprune.MeanBudget(t), policy="threshold")
            gated.calibration.add(entry)
            record("mean_threshold", t, collect(gated, test, budget=dynprune.MeanBudget(t)),
                   {"policy": json.dumps(entry.policy.__dict__), "val_flops": entry.fitted["flops_ratio_mean"],
                    "val_accuracy": entry.fitted["accuracy"]})  # fmt: skip
            record("mean_ckpt_at_cap", t, collect(gated, test, budget=t))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    old = []
    if args.out.is_file():
        with args.out.open() as f:
            mine = {(r["seed"], r["method"]) for r in rows}
            old = [r for r in csv.DictReader(f) if (int(r["seed"]), r["method"]) not in mine]
            keys += [k for r in old for k in r if k not in keys]
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(old + rows)


if __name__ == "__main__":
    main()
