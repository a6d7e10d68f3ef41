"""`dynprune sweep --config configs/sweep_minilm_rt.yaml [--quick] [--restart] [--section.key=value ...]`

Runs every method over a list of budgets on the training run's split and
writes, in ``output_dir``:

    sweep.csv          one row per (method, budget, seed): accuracy, FLOPs, latency, speedups, size
    pareto.png         accuracy (mean ± std over seeds) vs FLOPs ratio and vs measured speedup
    summary.md         machine, settings, goals (paired bootstrap intervals), the table, notes
    points/*.json      one file per finished point (everything measured, incl. per-example
                       correctness for paired comparisons; written atomically)
    sweep_config.yaml  the resolved config

The contenders (dynamic, static_gates, early_exit, static_early_exit, static_gates_ft, static_cascade, static_cascade_ft) run
for every seed in
``seeds``; the classic methods and dense once (``seed``). A finished point is never recomputed: a re-run (after a crash or Ctrl-C)
reads ``points/`` and continues with the rest; fine-tuned models are cached in
``work_dir`` as soon as they exist. A re-run with settings that change what a
point means (fine-tuning, search, data, training run) stops with an error
instead of mixing results; ``--restart`` discards the finished points.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from dynprune.eval.report import COLUMNS, machine_description, plot_pareto, write_summary
from dynprune.eval.sweep_config import SweepConfig, changed_settings, fingerprint, from_dict
from dynprune.eval.sweep_context import SweepError, TrainingRun, dynamic_budget, seed_run
from dynprune.eval.sweep_stats import (
    CONTENDERS,
    aggregate,
    best_static,
    flops_lines,
    goal_budget,
    goals,
    speed_lines,
)
from dynprune.eval.timing import busy_cpu_note

from dynprune.calibration import Calibration
from dynprune.config import check_budget_value
from dynprune.io import atomic_write_bytes

# Methods built from the seed's static control (they need its static/ stage)
STATIC_CONTROL_METHODS = ("static_early_exit", "static_gates_ft", "static_cascade", "static_cascade_ft")
# The order points run in: dense, the contenders, then the classic methods (cheapest first)
COST_ORDER = ("dense", *CONTENDERS, "ln_structured", "random", "search", "iterative", "magnitude")


# -- config and preflight -------------------------------------------------------------------------
def parse_args(argv: list[str]) -> tuple[SweepConfig, bool]:
    import draccus

    argv = list(argv)
    quick = "--quick" in argv
    restart = "--restart" in argv
    argv = [a for a in argv if a not in ("--quick", "--restart")]
    config_path = None
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    if config_path is not None and not Path(config_path).is_file():
        raise SweepError(f"--config {config_path!r}: no such file")
    try:
        cfg = draccus.parse(
            SweepConfig, config_path=config_path, args=rest, prog="dynprune sweep", exit_on_error=False
        )
        return (cfg.apply_quick(keep=_given_keys(rest)) if quick else cfg), restart
    except Exception as err:  # draccus wraps our __post_init__ errors: report the innermost message
        where = f" (config {config_path})" if config_path else ""
        raise SweepError(f"bad sweep config: {_root_cause(err)}{where}") from err


def _given_keys(args: list[str]) -> list[str]:
    """The dotted config keys set on the command line (``--methods a b``, ``--finetune.steps=9``)."""
    return [a[2:].split("=", 1)[0] for a in args if a.startswith("--") and not a[2:].startswith("quick.")]


def _root_cause(err: BaseException) -> str:
    messages, seen = [], set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if str(cur):
            messages.append(str(cur))
        cur = cur.__cause__ or cur.__context__
    return messages[-1] if messages else type(err).__name__


def point_key(method: str, budget: float, seed: int) -> str:
    return f"{method}@{budget:g}_s{seed}"


def grid(cfg: SweepConfig) -> list[tuple[str, float, int]]:
    """Every (method, budget, seed) of the sweep: the first seed of every method first, cheapest
    methods first (dense once, at 1.0), then the contenders' other seeds."""
    methods = [m for m in COST_ORDER if m in cfg.methods]
    seeds = cfg.contender_seeds
    points = []
    for i, seed in enumerate(seeds):
        for m in methods:
            if m not in CONTENDERS and i > 0:
                continue
            s = seed if m in CONTENDERS else cfg.seed
            points += [(m, 1.0, s)] if m == "dense" else [(m, b, s) for b in cfg.budgets]
    return points


def _check_calibrations(cfg: SweepConfig, gated_dir: Path) -> None:
    """budget_mode=mean: the dynamic checkpoint has a calibrated policy for every swept budget."""
    have = Calibration.load(gated_dir / "gates")
    for b in cfg.budgets:
        if b < 1.0:
            try:
                have.lookup(dynamic_budget(cfg, b))
            except ValueError as err:
                raise SweepError(str(err).replace("DIR", str(gated_dir))) from None


def preflight(cfg: SweepConfig, restart: bool) -> TrainingRun:
    """Every check that can fail before the long work starts."""
    run = TrainingRun.open(cfg.training_dir)
    _check_stages(run, {"dense": run.dense_dir})
    gated_methods = [m for m in ("dynamic", "static_gates", *STATIC_CONTROL_METHODS) if m in cfg.methods]
    for seed in cfg.contender_seeds if gated_methods else []:
        r = seed_run(cfg, run, seed)
        need = {"gated": r.gated_dir} if "dynamic" in gated_methods else {}
        if {"static_gates", *STATIC_CONTROL_METHODS} & set(gated_methods):
            need["static"] = r.static_dir
        _check_stages(r, need)
        if "dynamic" in gated_methods and cfg.budget_mode == "mean":
            _check_calibrations(cfg, r.gated_dir)
        low, high = r.budget_range()
        for b in cfg.budgets:
            if not (low - 1e-9 <= b <= high + 1e-9):
                raise SweepError(
                    f"budget {b} is outside the range the gated models were trained for [{low}, {high}] "
                    f"(gate.budget_min/max of {r.root}/config.yaml); choose budgets inside it"
                )
            cascades = [m for m in ("static_cascade", "static_cascade_ft") if m in cfg.methods]
            if cascades and b < 1.0 and b <= low + 1e-9:
                raise SweepError(
                    f"{cascades[0]} cannot run budget {b}: its first pass needs a lower budget, and {low} is the "
                    f"lowest the static control of {r.root} was trained for; drop that budget or the method (--methods)"
                )
    if "early_exit" in cfg.methods:
        from dynprune.eval.sweep_early_exit import cheapest_ratio

        floor = cheapest_ratio(run.dense_dir, int((run.config.get("data") or {}).get("max_length", 512)))
        if min(cfg.budgets) < floor:
            raise SweepError(
                f"early_exit cannot reach budget {min(cfg.budgets)}: one layer plus its exit head already costs "
                f"up to {floor:.3f} of dense; drop that budget or the method (--methods)"
            )
    for b in cfg.budgets:
        check_budget_value(b, "budget")
        if "dynamic" in cfg.methods:
            from dynprune.eval.sweep_context import dynamic_budget

            dynamic_budget(cfg, b)  # a mean-budget mode this dynprune cannot serve fails here
    out = Path(cfg.output_dir)
    meta = out / "sweep_meta.json"
    if meta.is_file() and not restart:
        diff = changed_settings(json.loads(meta.read_text()).get("fingerprint", {}), cfg)
        if diff:
            raise SweepError(
                f"{out} holds points computed with different settings ({', '.join(diff)}); re-run with the "
                "same settings to resume, pass --restart to discard them, or choose another --output_dir"
            )
    return run


def _check_stages(run: TrainingRun, need: dict[str, Path]) -> None:
    for stage, path in need.items():
        marker = path / ("metrics.json" if stage != "dense" or path == run.root / "dense" else "config.json")
        if not marker.is_file():
            raise SweepError(
                f"the training run {str(run.root)!r} has no finished {stage!r} stage ({str(marker)!r} missing); "
                f"finish `dynprune train` (--resume) or drop the methods that need it (--methods)"
                + _seed_hint(run)
            )


def _seed_hint(run: TrainingRun) -> str:
    if run.root.exists():
        return ""
    return (
        f". A contender seed's run is trained with the same recipe, another seed and the shared teacher, e.g. "
        f"`dynprune train --config CONFIG --seed=S --stages=[gated,static] --model.teacher_path=DENSE "
        f"--output_dir={run.root}` (docs/evaluation.md, 'Seeds')"
    )


# -- points on disk -----------------------------------------------------------------------------
def load_points(out: Path) -> dict[str, dict[str, Any]]:
    points = {}
    for f in sorted((out / "points").glob("*.json")):
        try:
            row = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue  # a torn file cannot exist (atomic writes), but never trust one
        points[point_key(row["method"], float(row["budget"]), int(row.get("seed", 0)))] = row
    return points


def save_point(out: Path, row: dict[str, Any]) -> None:
    name = point_key(row["method"], float(row["budget"]), int(row["seed"])) + ".json"
    atomic_write_bytes(out / "points" / name, json.dumps(row, indent=1, default=_json_default).encode())


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def ordered_rows(points: dict[str, dict[str, Any]], cfg: SweepConfig) -> list[dict[str, Any]]:
    order = {m: i for i, m in enumerate(("dense", *[m for m in cfg.methods if m != "dense"]))}
    rows = [p for p in points.values() if p["method"] in order]
    return sorted(rows, key=lambda r: (order[r["method"]], -float(r["budget"]), int(r.get("seed", 0))))


def goal_lines(cfg: SweepConfig, rows: list[dict[str, Any]]) -> list[str]:
    """Accuracy goals (paired bootstrap), executed FLOPs vs target, speedups beside ideal."""
    agg = aggregate(rows)
    lines = [g.line(cfg.indicative) for g in goals(rows, cfg.stats)]
    return lines + flops_lines(agg, indicative=cfg.indicative) + speed_lines(agg)


def write_outputs(
    cfg: SweepConfig,
    points: dict[str, dict[str, Any]],
    header: str,
    notes: list[str],
    title: str | None = None,
) -> None:
    """sweep.csv, pareto.png (titled ``title``, default: the training run) and summary.md of ``points``."""
    out = Path(cfg.output_dir)
    rows = ordered_rows(points, cfg)
    agg = aggregate(rows)
    lines = goal_lines(cfg, rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})
    atomic_write_bytes(out / "sweep.csv", buf.getvalue().encode())
    if rows:
        b = goal_budget(rows)
        static = best_static(rows, b)
        mark = next((r for r in agg if r["method"] == static and abs(r["budget"] - b) < 1e-6), None)
        plot_pareto(
            agg, out / "pareto.png", title=f"{title or f'dynprune sweep: {cfg.training_dir}'} ({len(rows)} points)",
            goal_lines=lines[:3], goal=None if mark is None else (b, static, mark["accuracy"]),
        )  # fmt: skip
    spent = sum(float(r.get("seconds") or 0) for r in rows)
    progress = f"- {len(rows)} of {len(grid(cfg))} points done; their compute time: {spent / 60:.1f} min (sum over points)"
    write_summary(agg, out / "summary.md", header + "\n" + progress, lines, notes)


def _csv_value(x: Any) -> Any:
    if isinstance(x, float):
        return "" if math.isnan(x) else f"{x:.6g}"
    return "" if x is None else x


# -- main ---------------------------------------------------------------------------------------
def _header(cfg: SweepConfig, ctx: Any, started: str) -> str:
    run = ctx.run
    gated_steps = run.stage_steps("gated")
    return "\n".join(
        [
            f"# Accuracy–FLOPs–latency sweep: {run.root}",
            "",
            f"- machine: {machine_description()}",
            f"- started {started}; command: `dynprune sweep` with `{cfg.output_dir}/sweep_config.yaml`",
            f"- data: training run's split, evaluation on `{cfg.evaluation.split}` "
            f"({sum(b['labels'].shape[0] for b in ctx.eval_batches)} examples, dynamic padding, mean padded "
            f"length {ctx.ref_seq})",
            f"- fine-tuning of every pruned baseline (dynprune.train.finetune): {ctx.finetune_steps} steps × batch "
            f"{cfg.finetune.batch_size} per (method, budget), lr {ctx.lr}, distillation from the shared dense teacher: "
            f"{cfg.finetune.distill}. "
            + (
                f"The dynamic model's gated stage ran {gated_steps} steps for all budgets at once"
                if gated_steps is not None
                else "The training run has no gated stage (the steps were set with --finetune.steps)"
            )
            + _match_note(cfg, ctx, gated_steps),
            f"- latency: {cfg.timing.bs1_inputs} single inputs (batch 1; time per input = the set's time / its "
            f"size) and {cfg.timing.bs16_batches} batches of 16, {cfg.timing.repeats} interleaved rounds after "
            f"{cfg.timing.warmup} warm-up, medians",
            f"- seeds: contenders ({', '.join(m for m in CONTENDERS if m in cfg.methods)}) over seeds "
            f"{cfg.contender_seeds} (dynamic/static_gates: one training run per seed, "
            f"`{cfg.seed_training_dir}` for seeds other than the training run's own); dense and the classic "
            f"methods once (seed {cfg.seed}); dynamic budget mode: {cfg.budget_mode}"
            + (
                f"\n- **{cfg.indicative}**: comparisons carry no MET/MISSED verdicts"
                if cfg.indicative
                else ""
            ),
        ]
    )


def _match_note(cfg: SweepConfig, ctx: Any, gated: int | None) -> str:
    if cfg.finetune.steps is not None or not gated:
        return "."
    if cfg.finetune.match == "per_method":
        return (
            f"; each static method gets {gated} / {len(cfg.budgets)} budgets = {ctx.finetune_steps} steps per point, "
            "i.e. the same total fine-tuning steps over the grid as the dynamic model (finetune.match=per_method)."
        )
    return "; every point gets that many steps (finetune.match=per_point)."


NOTES = [
    "`flops_ratio` = executed FLOPs / dense FLOPs per sample at its batch's padded length, averaged "
    "(dynprune.flops formulas; static models counted per kept head/neuron with the same formulas).",
    "`magnitude` keeps its zeros in dense matrices: executed FLOPs and time stay dense (see "
    "`nonzero_flops_ratio` for what a sparse kernel could skip).",
    "`static_gates` is the training run's input-independent router frozen to its most common mask; "
    "static models are physically smaller dense models, exported and reloaded before being measured.",
    "`random` keeps random heads/neurons with ln_structured's per-layer counts (sanity control).",
    "`early_exit` (DeeBERT/PABEE-style) is the dense model with a classifier after every layer, fine-tuned "
    "once for all budgets (the fine-tuning steps of one method over the grid) with the same distillation; a "
    "sample leaves at the first exit whose max softmax probability reaches the threshold, calibrated per "
    "budget on the validation split to the largest mean FLOPs ratio <= the budget. Its FLOPs count the "
    "layers run plus every exit head evaluated.",
    "`static_early_exit` puts those exits on the static_gates model at a wider budget (early_exit.width_factor "
    "x the target, at most the static control's largest trained budget) and calibrates them down to the "
    "target mean: width from the static control, depth from the input. Its exits are fine-tuned like "
    "`early_exit`'s, on top of the static control's own training (so it has had both runs' steps).",
    "`static_gates_ft` is the equal-steps control of `static_early_exit`: the `static_gates` export fine-tuned "
    "for the same extra steps (labels + distillation, no exits). It counts as a static method in the goals.",
    "`static_cascade` runs the static control at a mean budget: every input at a low budget, the least "
    "confident re-run at a higher one (both passes counted); the (low, high, confidence) triple is fitted "
    "per budget on the validation split, the confidence governed while evaluating (cascade.governor). No "
    "fine-tuning: it has the static control's steps only (as `static_gates`, fewer than `static_gates_ft`).",
    "`static_cascade_ft` is that cascade at equal steps: the `static_gates` exports at static_cascade's "
    "(low, high) pair, each fine-tuned half of `static_gates_ft`'s steps, the confidence re-fitted on "
    "validation for the fine-tuned pair (and governed the same way).",
    "Goals: paired bootstrap over the evaluation examples of the seed-averaged per-example correctness "
    "(dynprune.eval.sweep_stats); MET needs the estimate at the goal and the interval clear of the null "
    "value, NOT SHOWN = estimate at the goal but not significant, no verdict with too few seeds.",
]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        import draccus

        draccus.parse(SweepConfig, args=["--help"], prog="dynprune sweep", exit_on_error=False)
        return 0
    try:
        cfg, restart = parse_args(argv)
        run = preflight(cfg, restart)
    except (SweepError, ValueError, FileNotFoundError) as err:
        print(f"dynprune sweep: error: {err}", file=sys.stderr)
        return 2
    note = busy_cpu_note()
    if note:
        print(f"dynprune sweep: warning: {note}", file=sys.stderr, flush=True)
    return run_sweep(cfg, run, restart)


def run_sweep(cfg: SweepConfig, run: TrainingRun, restart: bool = False) -> int:
    import draccus
    import torch
    from dynprune.eval.sweep_context import build_context
    from dynprune.eval.sweep_methods import POINTS
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    if restart and (out / "points").is_dir():
        shutil.rmtree(out / "points")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.timing.threads)
    atomic_write_bytes(out / "sweep_config.yaml", draccus.dump(cfg).encode())
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_bytes(
        out / "sweep_meta.json", json.dumps({"fingerprint": fingerprint(cfg), "started": started}).encode()
    )
    points = load_points(out)
    todo = [(m, b, s) for m, b, s in grid(cfg) if point_key(m, b, s) not in points]
    print(f"dynprune sweep: {len(points)} point(s) already done, {len(todo)} to go -> {out}", flush=True)
    ctx = build_context(cfg, run)
    header = _header(cfg, ctx, started)
    total = len(grid(cfg))
    with tqdm(total=total, initial=total - len(todo), desc="sweep", unit="point", dynamic_ncols=True) as bar:
        for method, budget, seed in todo:
            bar.set_postfix_str(point_key(method, budget, seed))
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            row = POINTS[method](ctx, budget, seed)
            row.update(method=method, budget=budget, seed=seed, seconds=round(time.perf_counter() - t0, 1))
            save_point(out, row)
            points[point_key(method, budget, seed)] = row
            write_outputs(cfg, points, header, NOTES + cfg.summary_notes)
            bar.update(1)
    write_outputs(cfg, points, header, NOTES + cfg.summary_notes)
    print((out / "sweep.csv").read_text())
    for line in goal_lines(cfg, ordered_rows(points, cfg)):
        print(line)
    return 0


def config_from_yaml(path: str) -> SweepConfig:
    import yaml

    return from_dict(yaml.safe_load(Path(path).read_text()))


if __name__ == "__main__":
    sys.exit(main())
