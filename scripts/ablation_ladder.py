"""Ablation ladder: static control vs dynamic router variants on the quick recipe, several seeds.

    python scripts/ablation_ladder.py                       # every variant x seeds 0,1,2
    python scripts/ablation_ladder.py --variants static dynamic --seeds 0 1 2 --commit

One dense teacher per seed (``RUNS/seed<S>/dense``) is shared by every variant of that
seed (``--model.teacher_path``); each variant is a gated-only run in ``RUNS/seed<S>/<variant>``.
Every run is one child process; the parent holds the shared CPU lock (as ``flock LOCK``
does) while the pending runs execute, variant by variant (every seed of one variant, the
dense teachers first), so that a ladder cut short still has whole variants.
``--collect`` adds runs that finished (e.g. under an interrupted parent) to the table. Resumable: a run whose rows are already in the CSV is skipped, an
unfinished run continues from its checkpoint (``--resume``). After each run the rows
(test split, budgets of the recipe) are appended to ``OUT/ladder.csv`` and ``OUT/ladder.md``
is rewritten (mean +- std over seeds); ``--commit`` commits OUT after each run.

A variant is a stage (``gated`` = dynamic router, ``static`` = the control), config
overrides, and optionally a patch applied in the child only (experiments, not knobs).
Rows record the git commit they were produced at: a variant whose patch is gone from
the code base is kept in the table with the commit that ran it.

A variant trained with ``gate.budget_mode=mean`` (``dynamic_mean``) is recorded at *mean*
budgets: after training, the child evaluates the test split at ``MeanBudget(b)`` for every
budget of the recipe with the threshold calibrated on validation at the end of the stage
(``gates/calibration.json``; ``report/mean_budget.csv``), and those rows carry
``budget_kind=mean`` (``budget`` = the target, ``flops_ratio_mean`` = what the inputs
executed on average). Its pipeline report at caps per input goes in as ``<variant>_at_cap``
(``budget_kind=cap``): how the mean-trained router does under a cap, not the comparison
that matters. ``--seed-major`` runs every variant of one seed before the next seed (an early
signal on seed 0); the default is variant-major (a cut leaves whole variants).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ladder_table import read_rows, write_table

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [
    "variant",
    "seed",
    "budget",
    "budget_kind",
    "accuracy",
    "flops_ratio_mean",
    "hamming_frac",
    "distinct_masks",
    "train_seconds",
    "commit",
    "machine",
]


@dataclass
class Variant:
    description: str
    stage: str = "gated"  # gated (dynamic router) | static (control) | dense (the teacher)
    overrides: list[str] = field(default_factory=list)
    patch: Callable[[], contextlib.AbstractContextManager] | None = None
    budget_mode: str = "cap"  # "mean": trained with --gate.budget_mode=mean, recorded at mean budgets


@contextlib.contextmanager
def _input_disabled() -> Iterator[None]:
    """The dynamic router with its input path switched off: input weights zero and frozen.

    With zero input weights the router's hidden layer is a function of the budget alone (its
    input term is a constant), and no gradient reaches the backbone through the router."""
    import torch

    import dynprune

    wrap = dynprune.wrap

    def patched(model, config=None, **kw):
        gm = wrap(model, config, **kw)
        proj = gm.router.inp
        if proj is not None and proj.weight.device.type != "meta":
            with torch.no_grad():
                proj.weight.zero_()
            proj.weight.requires_grad_(False)
        return gm

    dynprune.wrap = patched
    try:
        yield
    finally:
        dynprune.wrap = wrap


@contextlib.contextmanager
def _detached_input() -> Iterator[None]:
    """The dynamic router reads a detached copy of the hidden states: no gradient from the
    router (FLOPs penalty, gate gradients) reaches the backbone through the router's input."""
    from dynprune.router import Router

    forward = Router.forward

    def patched(self, hidden, attention_mask, budget):
        return forward(self, hidden.detach(), attention_mask, budget)

    Router.forward = patched
    try:
        yield
    finally:
        Router.forward = forward


VARIANTS: dict[str, Variant] = {
    "dense": Variant("dense teacher (shared by every variant of a seed)", stage="dense"),
    "static": Variant("static control (router reads only the budget)", stage="static"),
    "dynamic_no_input": Variant(
        "dynamic router, input path disabled (input weights zero, frozen)", patch=_input_disabled
    ),
    "dynamic": Variant("dynamic router, as configured"),
    "dynamic_detached": Variant("dynamic router reading detached hidden states", patch=_detached_input),
    "dynamic_layer1": Variant(
        "dynamic router reading the output of layer 1 (always dense) instead of the embeddings",
        overrides=["--gate.router_layer=1"],
    ),
    "dynamic_mean": Variant(
        "dynamic router trained for mean budgets (gate.budget_mode=mean), test at MeanBudget(b) "
        "with its threshold calibrated on validation",
        overrides=["--gate.budget_mode=mean"],
        budget_mode="mean",
    ),
}
#: table labels of rows that are not a variant of their own: a mean-mode variant at a cap per input
AT_CAP = "_at_cap"


def _git_commit() -> str:
    """The commit of the code that ran (LADDER_COMMIT when running from an exported snapshot)."""
    if os.environ.get("LADDER_COMMIT"):
        return os.environ["LADDER_COMMIT"]
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "dynprune", "train"], cwd=ROOT).returncode
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _run_dir(runs: Path, seed: int, variant: str) -> Path:
    return runs / f"seed{seed}" / variant


def run_one(config: str, runs: Path, seed: int, variant: str, extra: list[str]) -> None:
    """Child process: train + report one (seed, variant)."""
    from dynprune.train.cli import dump_config, parse_config
    from dynprune.train.pipeline import run

    v = VARIANTS[variant]
    out = _run_dir(runs, seed, variant)
    args = [
        "--config",
        config,
        f"--output_dir={out}",
        f"--seed={seed}",
        "--logging.report_to=none",
        "--logging.progress=false",
    ]
    if (out / "config.yaml").is_file():
        args.append("--resume")
    if v.stage == "dense":
        args.append("--stages=[dense]")
    else:
        teacher = _run_dir(runs, seed, "dense") / "dense"
        if not (teacher / "metrics.json").is_file():
            raise SystemExit(f"the dense teacher of seed {seed} is missing: {teacher}")
        args += [f"--stages=[{v.stage}]", f"--model.teacher_path={teacher}", *v.overrides]
    args += extra
    cfg = parse_config(args)
    if not (out / "report" / "results.csv").is_file():
        with v.patch() if v.patch else contextlib.nullcontext():
            run(cfg, dump_config(cfg))
    if v.budget_mode == "mean":
        mean_eval(cfg, out / v.stage, out / "report" / "mean_budget.csv")


def mean_eval(cfg, ckpt: Path, dest: Path) -> None:
    """Test split at MeanBudget(b) for every recipe budget b < 1, with the calibration saved with
    the gates (fitted on the whole validation split at the end of the stage, evaluation batches
    of ``optim.eval_batch_size``: the same batching here). Writes ``dest`` (atomically)."""
    import transformers
    from dynprune.train.adaptivity import mask_stats
    from dynprune.train.data import Collator, encode, eval_batches, load_task_data
    from dynprune.train.evaluation import collect, summarize

    import dynprune

    gated, tok = dynprune.load_gated_model(ckpt)
    missing = [b for b in cfg.evaluation.budgets if b < 1 and f"mean:{b:g}" not in gated.calibration.entries]
    if missing:
        raise SystemExit(f"{ckpt}: no saved calibration for mean budgets {missing}")
    transformers.logging.set_verbosity_error()
    ex = encode(load_task_data(cfg.data), tok, cfg.data.max_length)[cfg.evaluation.split]
    collate = Collator(tok.pad_token_id, getattr(tok, "padding_side", "right"))
    loader = [collate([ex[i] for i in b]) for b in eval_batches(ex, cfg.optim.eval_batch_size)]
    rows = []
    for b in (b for b in cfg.evaluation.budgets if b < 1):
        entry = gated.calibration.entries[f"mean:{b:g}"]
        rec = collect(gated, loader, budget=dynprune.MeanBudget(b), keep_masks=True)
        s = summarize(rec)
        rows.append({
            "budget": b, "accuracy": s["accuracy"], "flops_ratio_mean": s["flops_ratio_mean"],
            "flops_ratio_p5": s["flops_ratio_p5"], "flops_ratio_p50": s["flops_ratio_p50"],
            "flops_ratio_p95": s["flops_ratio_p95"], "val_flops_ratio": entry.fitted.get("flops_ratio_mean"),
            "calibration_n": entry.fitted.get("n"), "policy": json.dumps(entry.policy.__dict__),
            **{k: mask_stats(rec)[k] for k in ("hamming_frac", "distinct_masks")},
        })  # fmt: skip
    tmp = dest.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(dest)


def _rows_of_run(out: Path, seed: int, variant: str, commit: str) -> list[dict]:
    from dynprune.train.report import machine

    v = VARIANTS[variant]
    stage = v.stage
    results = list(csv.DictReader((out / "report" / "results.csv").open()))
    adapt_file = out / "report" / "adaptivity.csv"
    adapt_rows = list(csv.DictReader(adapt_file.open())) if adapt_file.is_file() else []
    adapt = {r["budget"]: r for r in adapt_rows if r["group"] == "all (mask stats)"}

    train_s = ""
    metrics = out / stage / "metrics.json"
    if stage == "dense":
        metrics = out / "dense" / "metrics.json"
    if metrics.is_file():
        train_s = f"{json.loads(metrics.read_text())['train']['train_seconds']:.0f}"
    rows = []
    for r in results:
        if r["model"] != stage:
            continue
        a = adapt.get(r["budget"], {})
        rows.append(
            {
                "variant": variant + (AT_CAP if v.budget_mode == "mean" and stage != "dense" else ""),
                "seed": seed,
                "budget": float(r["budget"]),
                "budget_kind": "cap",
                "accuracy": float(r["accuracy"]),
                "flops_ratio_mean": float(r["flops_ratio_mean"]),
                "hamming_frac": a.get("hamming_frac", ""),
                "distinct_masks": a.get("distinct_masks", ""),
                "train_seconds": train_s,
                "commit": commit,
                "machine": machine(),
            }
        )
    if v.budget_mode == "mean":
        for r in csv.DictReader((out / "report" / "mean_budget.csv").open()):
            rows.append({
                "variant": variant, "seed": seed, "budget": float(r["budget"]), "budget_kind": "mean",
                "accuracy": float(r["accuracy"]), "flops_ratio_mean": float(r["flops_ratio_mean"]),
                "hamming_frac": r["hamming_frac"], "distinct_masks": r["distinct_masks"],
                "train_seconds": train_s, "commit": commit, "machine": machine(),
            })  # fmt: skip
    return rows


def _finished(runs: Path, seed: int, variant: str) -> bool:
    out = _run_dir(runs, seed, variant) / "report"
    return (out / "results.csv").is_file() and (
        VARIANTS[variant].budget_mode != "mean" or (out / "mean_budget.csv").is_file()
    )


@contextlib.contextmanager
def _cpu_lock(path: str) -> Iterator[None]:
    """Hold the shared CPU lock (the same lock as ``flock PATH cmd``)."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _done(csv_path: Path, seed: int, variant: str) -> bool:
    return any(r["variant"] == variant and int(r["seed"]) == seed for r in read_rows(csv_path))


def describe(variant: str) -> str:
    """The table's description of a variant (its ``_at_cap`` row: how it was evaluated)."""
    if variant.endswith(AT_CAP) and variant[: -len(AT_CAP)] in VARIANTS:
        return f"{variant[: -len(AT_CAP)]} evaluated at a cap per input (not what it was trained for)"
    return VARIANTS[variant].description if variant in VARIANTS else variant


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/minilm_rt_quick.yaml")
    p.add_argument("--runs", default="runs/ablation", help="work directory (not committed)")
    p.add_argument("--out", default="results/minilm_rt/ablation", help="CSV + markdown table")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "dense"])
    p.add_argument("--lock", default="/tmp/dynprune-cpu.lock")
    p.add_argument("--commit", action="store_true", help="git-commit OUT after each run")
    p.add_argument(
        "--collect", action="store_true", help="only add finished runs to the table (no training, no lock)"
    )
    p.add_argument(
        "--set", action="append", default=[], help="extra override for every run: --set=--optim.max_steps=2"
    )
    p.add_argument("--seed-major", action="store_true", help="every variant of a seed before the next seed")
    p.add_argument("--one", nargs=2, metavar=("SEED", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    runs, out = Path(a.runs), Path(a.out)
    if a.one:
        run_one(a.config, runs, int(a.one[0]), a.one[1], a.set)
        return 0
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "ladder.csv"
    order = list(VARIANTS)
    # variant-major (all seeds of one variant before the next): cut short, it leaves whole variants
    variants = ["dense", *[v for v in a.variants if v != "dense"]]
    pairs = (
        [(s, v) for s in a.seeds for v in variants]
        if a.seed_major
        else [(s, v) for v in variants for s in a.seeds]
    )
    todo = [(seed, v) for seed, v in pairs if not _done(csv_path, seed, v)]
    if not todo:
        write_table(read_rows(csv_path), out / "ladder.md", order, describe)
        return 0
    lock = contextlib.nullcontext() if a.collect else _cpu_lock(a.lock)
    with lock:  # every pending run under one hold of the shared CPU lock
        for seed, variant in todo:
            finished = _finished(runs, seed, variant)
            if a.collect and not finished:
                continue
            if not finished:
                print(f"== seed {seed} {variant}", flush=True)
                cmd = [sys.executable, __file__, "--config", a.config, "--runs", str(runs)]
                subprocess.run(
                    [*cmd, "--one", str(seed), variant, *[f"--set={x}" for x in a.set]], check=True
                )
            commit = _git_commit()
            rows = read_rows(csv_path)
            new = _rows_of_run(_run_dir(runs, seed, variant), seed, variant, commit)
            with csv_path.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if not rows:
                    w.writeheader()
                w.writerows(new)
            write_table(read_rows(csv_path), out / "ladder.md", order, describe)
            if a.commit:  # only OUT is committed; a failure (e.g. a busy index) waits for the next run
                msg = f"ablation ladder: seed {seed} {variant} ({commit})"
                subprocess.run(["git", "-C", str(out), "add", "."], check=False)
                subprocess.run(["git", "-C", str(out), "commit", "-q", "-m", msg, "--", "."], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
