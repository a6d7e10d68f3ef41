"""Mean-budget comparison on quick-recipe checkpoints, one seed per call (accuracy, not timing).

    nice -n 10 python scripts/mean_budget_eval.py --runs ../ladder/runs/ablation \
        --mean-runs runs/mean_budget --seed 0 --out results/minilm_rt/mean_budget
    nice -n 5 python scripts/mean_budget_eval.py --runs /work/runs-mean/ablation --models static \
        --seed 0 --out results/minilm_rt/mean_budget_trained      # mean router: RUNS/seed0/dynamic_mean

Checkpoints (read only; calibrations are fitted in memory, never written there):
``RUNS/seed<S>/static/static`` (static control), ``RUNS/seed<S>/dynamic/gated`` (cap-trained
dynamic router), ``MEAN_RUNS/seed<S>/gated`` (router trained with ``gate.budget_mode=mean``;
without ``--mean-runs``: the ladder's ``RUNS/seed<S>/<--mean-variant>/gated``, default
``dynamic_mean``); the dense teacher is the runs' ``model.teacher_path`` (a run that trained its
own dense stage: its ``dense/``; e.g. RUNS/seed0/static -> runs/news20_quick, a symlink to a
whole ``dynprune train`` output directory). Whatever exists is evaluated.

Per target t in (0.25, 0.5), on the test split, calibrated on the validation split (batch 64,
the batches evaluation uses, so that padded lengths and FLOPs match):
- ``<model>_cap``: a cap per input = t (greedy fill; every input costs about t)
- ``<model>_cascade``: ``MeanBudget(t)`` with the cascade policy (run low, re-run the least
  confident inputs high; both passes counted)
- ``mean_threshold``: the mean-trained router, ``MeanBudget(t)`` with the threshold policy
  (re-fitted here on the same validation batches as the cascades; the threshold saved at the
  end of training, fitted on all of validation at the training's evaluation batch size, is
  recorded beside it as ``saved_threshold``)
- ``<method>_governed`` (for both calibrated methods): the same policy with its knob corrected
  online while the test batches run in a seeded random order (``dynprune.govern``); when the
  method's own row exists from an earlier call, ``<method>_refit`` is the ungoverned policy of
  this call's fit (floating-point differences between machines can change which cascade pair
  wins), the reference the governed row is compared with
- ``mean_ckpt_cap``: the mean-trained router at a cap per input = t (not what it was trained
  for: a reference, not the comparison that matters)
Writes ``rows.csv`` (one row per seed x method x target) and ``per_example.npz`` (correct /
FLOPs ratio per test example, for paired intervals) after every row; a re-run skips the rows
that exist (resumable; delete them to redo). ``--calibration-examples N`` fits on the first N
validation examples (the split is shuffled once, so they are a random subset).
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
from dynprune.train.evaluation import Records, collect
from dynprune.train.report import machine

import dynprune
from dynprune.calibration_fit import fit

TARGETS = (0.25, 0.5)
MODELS = {"static": ("static", "static"), "dynamic": ("dynamic", "gated")}  # name -> (run, stage dir)


def quartile_means(key: np.ndarray, value: np.ndarray) -> list[float]:
    """Mean of ``value`` in each quarter of the inputs ranked by ``key`` (lowest first). Ties are
    split by test-set order, so every quarter holds a quarter of the inputs even when most keys
    tie (20 Newsgroups texts truncated to the same length: value bins left a quartile empty)."""
    quarters = np.array_split(np.argsort(key, kind="stable"), 4)
    return [round(float(value[q].mean()), 4) if q.size else float("nan") for q in quarters]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return 0.0 if ra.std() == 0 or rb.std() == 0 else round(float(np.corrcoef(ra, rb)[0, 1]), 4)


def teacher_dir(cfg: dict, run_dir: Path) -> Path:
    """The dense teacher of a run: its ``model.teacher_path``, or, for a run that trained its own
    dense stage (``dynprune train`` with ``dense`` in its stages; teacher_path null), ``run_dir/dense``."""
    teacher = (cfg.get("model") or {}).get("teacher_path")
    return Path(teacher) if teacher else run_dir / "dense"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=Path, required=True, help="ladder root with seed<S>/{static,dynamic}")
    p.add_argument("--mean-runs", type=Path, default=None, help="root with seed<S>/gated (budget_mode=mean)")
    p.add_argument(
        "--mean-variant", default="dynamic_mean", help="without --mean-runs: RUNS/seed<S>/<this>/gated"
    )
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    p.add_argument("--calibration-examples", type=int, default=None, help="first N validation examples")
    p.add_argument("--limit", type=int, default=None, help="first N examples per split (smoke test)")
    args = p.parse_args()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    seed_dir = args.runs / f"seed{args.seed}"
    # the recipe (data, trained budget range, teacher): the control's run, else the mean-trained one
    cfg_file = next(
        (
            f
            for f in (seed_dir / "static" / "config.yaml", seed_dir / args.mean_variant / "config.yaml")
            if f.is_file()
        ),
        seed_dir / "static" / "config.yaml",
    )
    cfg = yaml.safe_load(cfg_file.read_text())
    gate = cfg.get("gate") or {}
    trained = (float(gate.get("budget_min", 0.2)), float(gate.get("budget_max", 0.8)))
    dense_dir = teacher_dir(cfg, cfg_file.parent)
    tok = transformers.AutoTokenizer.from_pretrained(dense_dir)
    data = load_task_data(DataConfig(**cfg["data"]))
    ex = encode(data, tok, cfg["data"]["max_length"])
    collate = Collator(tok.pad_token_id, getattr(tok, "padding_side", "right"))

    def batches(split: str, n: int | None) -> list:
        e = ex[split][:n]
        return [collate([e[i] for i in b]) for b in eval_batches(e, args.batch_size)]

    n_cal = args.calibration_examples if args.limit is None else args.limit
    val, test = batches("validation", n_cal), batches("test", args.limit)
    done, per_example = _existing(args.out)
    rows: list[dict] = []
    key = f"{args.seed}/dense_confidence"
    if key not in per_example:
        dense = transformers.AutoModelForSequenceClassification.from_pretrained(dense_dir).eval()
        dense_rec = collect(dense, test)
        per_example.update({
            f"{args.seed}/dense/correct": dense_rec.preds == dense_rec.labels,
            f"{args.seed}/lengths": dense_rec.lengths,
            key: dense_rec.probs.max(-1),
        })  # fmt: skip
        rows.append({"seed": args.seed, "method": "dense", "target": 1.0, "n_test": len(dense_rec.labels),
                     "accuracy": round(float((dense_rec.preds == dense_rec.labels).mean()), 6),
                     "flops_ratio_mean": 1.0, "machine": machine()})  # fmt: skip
        _write(args.out, rows, per_example)
    dense_conf = per_example[key]

    def record(method: str, target: float, rec: Records, extra: dict | None = None) -> None:
        r = rec.flops_ratio
        correct = rec.preds == rec.labels
        per_example[f"{args.seed}/{method}/{target:g}/correct"] = correct
        per_example[f"{args.seed}/{method}/{target:g}/ratio"] = r.astype(np.float32)
        row = {
            "seed": args.seed,
            "method": method,
            "target": target,
            "accuracy": round(float(correct.mean()), 6),
            "flops_ratio_mean": round(float(r.mean()), 6),
            "flops_ratio_p5": round(float(np.percentile(r, 5)), 4),
            "flops_ratio_p50": round(float(np.percentile(r, 50)), 4),
            "flops_ratio_p95": round(float(np.percentile(r, 95)), 4),
            "flops_by_length_q1_q4": json.dumps(quartile_means(rec.lengths, r)),
            "flops_by_dense_conf_q1_q4": json.dumps(quartile_means(dense_conf, r)),
            "spearman_flops_length": _spearman(rec.lengths, r),
            "spearman_flops_dense_conf": _spearman(dense_conf, r),
            "n_test": len(r),
            "machine": machine(),
            **(extra or {}),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(args.out, rows, per_example)

    def todo(method: str, target: float) -> bool:
        return (args.seed, method, target) not in done

    def calibrated(method: str, gated: dynprune.GatedModel, t: float, policy: str, passes: dict) -> None:
        if not (todo(method, t) or todo(f"{method}_governed", t)):
            return
        saved = gated.calibration.entries.get(dynprune.MeanBudget(t).spec)
        entry = fit(gated, val, dynprune.MeanBudget(t), policy=policy, trained=trained, passes=passes)
        gated.calibration.add(entry)
        extra = {
            "calibration_examples": entry.fitted["n"],
            "policy": json.dumps(entry.policy.__dict__),
            "val_flops_ratio": round(entry.fitted["flops_ratio_mean"], 6),
            "val_accuracy": round(entry.fitted["accuracy"], 6),
        }
        if policy == "threshold" and saved is not None:
            extra["saved_threshold"] = json.dumps(saved.policy.__dict__)
        fresh = todo(method, t)
        if fresh:
            record(method, t, collect(gated, test, budget=dynprune.MeanBudget(t)), extra)
        if todo(f"{method}_governed", t):  # the knob corrected online, test batches in a seeded random order
            if not fresh:  # the fit may differ from the one the method's row had: its own reference
                record(f"{method}_refit", t, collect(gated, test, budget=dynprune.MeanBudget(t)), extra)
            governed = dynprune.govern(gated, dynprune.MeanBudget(t))
            order = np.random.default_rng(args.seed).permutation(len(test))
            rec = collect(gated, [test[i] for i in order], budget=governed)
            record(f"{method}_governed", t, rec, {**extra, "final_knob": round(governed.governor.knob, 6)})

    for name in args.models:
        run, stage = MODELS[name]
        ckpt = seed_dir / run / stage
        if not (ckpt / "gates" / "gates.json").is_file():
            print(f"seed {args.seed}: no {name} checkpoint at {ckpt}, skipped", flush=True)
            continue
        gated, _ = dynprune.load_gated_model(ckpt)
        passes: dict = {}  # validation passes per budget, shared by the targets' cascade fits
        for t in args.targets:
            if todo(f"{name}_cap", t):
                record(f"{name}_cap", t, collect(gated, test, budget=t))
            calibrated(f"{name}_cascade", gated, t, "cascade", passes)
    if args.mean_runs is None:
        mean_ckpt = seed_dir / args.mean_variant / "gated"
    else:
        mean_ckpt = args.mean_runs / f"seed{args.seed}" / "gated"
    if mean_ckpt is not None and (mean_ckpt / "gates" / "gates.json").is_file():
        gated, _ = dynprune.load_gated_model(mean_ckpt)
        for t in args.targets:
            calibrated("mean_threshold", gated, t, "threshold", {})
            if todo("mean_ckpt_cap", t):
                record("mean_ckpt_cap", t, collect(gated, test, budget=t))


def _existing(out: Path) -> tuple[set[tuple[int, str, float]], dict[str, np.ndarray]]:
    """(seed, method, target) of the rows in OUT/rows.csv, and the arrays of OUT/per_example.npz."""
    done: set[tuple[int, str, float]] = set()
    if (out / "rows.csv").is_file():
        with (out / "rows.csv").open() as f:
            done = {(int(r["seed"]), r["method"], float(r["target"])) for r in csv.DictReader(f)}
    arrays: dict[str, np.ndarray] = {}
    if (out / "per_example.npz").is_file():
        with np.load(out / "per_example.npz") as z:
            arrays = {k: z[k] for k in z.files}
    return done, arrays


def _write(out: Path, rows: list[dict], per_example: dict[str, np.ndarray]) -> None:
    """Add ``rows`` to OUT/rows.csv (replacing rows of the same seed, method and target) and
    write OUT/per_example.npz (atomically, both)."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path, npz_path = out / "rows.csv", out / "per_example.npz"
    old: list[dict] = []
    if csv_path.is_file():
        with csv_path.open() as f:
            mine = {(int(r["seed"]), str(r["method"]), float(r["target"])) for r in rows}
            old = [
                r for r in csv.DictReader(f) if (int(r["seed"]), r["method"], float(r["target"])) not in mine
            ]
    keys: list[str] = []
    for r in old + rows:
        keys += [k for k in r if k not in keys]
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(sorted(old + rows, key=lambda r: (int(r["seed"]), str(r["method"]), float(r["target"]))))
    tmp.replace(csv_path)
    tmp = out / "per_example.tmp.npz"
    np.savez_compressed(tmp, **per_example)
    tmp.replace(npz_path)


if __name__ == "__main__":
    main()
