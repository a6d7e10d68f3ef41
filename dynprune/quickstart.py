"""`dynprune quickstart`: the README's main job, end to end on the packaged MiniLM + Rotten Tomatoes.

Four steps, each an ordinary dynprune command whose outputs land under ``--output-dir``
(default ``runs/quickstart``):

  1. train   ``dynprune train --config configs/minilm_rt_quick.yaml``: dense teacher, one
             budget-conditioned gated model for budgets 0.2-0.8, and the input-independent
             (static) control trained the same way                            -> OUT/train/
  2. eval    ``dynprune eval`` of the gated model at budgets 0.25 / 0.5 / 0.75 on the test
             split: accuracy, executed FLOPs, batch-1/16 latency next to dense -> OUT/eval/
  3. sweep   ``dynprune sweep --quick``: dynamic gates vs the static control, early exit,
             L2-structured and random pruning, every method with the same fine-tuning
             steps; one seed, so its comparison is labelled "quick grid: indicative only"
             and carries no MET/MISSED verdict                                -> OUT/sweep/
  4. demo    two contrasting reviews through the trained router: which units each one keeps

Every step is resumable: re-running the command after a crash or Ctrl-C continues where it
stopped (finished stages and sweep points are not recomputed). ``--skip-sweep`` stops after
step 2. Verdicts need the full recipe over three seeds (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

TRAIN_CONFIG = "minilm_rt_quick.yaml"
SWEEP_CONFIG = "sweep_minilm_rt.yaml"
BUDGETS = ("0.25", "0.5", "0.75")


class QuickstartError(RuntimeError):
    """A step cannot start (missing configs) or a step failed."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynprune quickstart", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output-dir", type=Path, default=Path("runs/quickstart"), help="where every step writes")
    p.add_argument(
        "--configs",
        type=Path,
        default=None,
        help="folder holding minilm_rt_quick.yaml and sweep_minilm_rt.yaml (default: ./configs, "
        "else the configs/ of the dynprune source checkout)",
    )
    p.add_argument("--skip-sweep", action="store_true", help="train + eval + demo only")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for eval and demo timing")
    return p


def find_configs(explicit: Path | None) -> Path:
    """The configs folder: --configs, ./configs, or the source checkout's configs/ (editable install)."""
    candidates = (
        [explicit] if explicit is not None else [Path("configs"), Path(__file__).parents[1] / "configs"]
    )
    for folder in candidates:
        if (folder / TRAIN_CONFIG).is_file() and (folder / SWEEP_CONFIG).is_file():
            return folder
    looked = ", ".join(repr(str(c)) for c in candidates)
    raise QuickstartError(
        f"cannot find {TRAIN_CONFIG} and {SWEEP_CONFIG} (looked in {looked}); run from the dynprune "
        "checkout or pass --configs DIR"
    )


def _run_step(title: str, command: str, main, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ dynprune {command} {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    code = int(main(argv) or 0)
    if code != 0:
        raise QuickstartError(f"step '{title}' failed (exit code {code}); re-run to resume")
    print(f"=== {title}: done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configs = find_configs(args.configs)
    except QuickstartError as err:
        print(f"dynprune quickstart: error: {err}")
        return 2

    from dynprune import demo
    from dynprune.eval import cli as eval_cli
    from dynprune.eval import sweep
    from dynprune.train import cli as train_cli

    out = args.output_dir
    train_dir, eval_dir, sweep_dir = out / "train", out / "eval", out / "sweep"
    started = time.perf_counter()
    train_argv = ["--config", str(configs / TRAIN_CONFIG), f"--output_dir={train_dir}"]
    if (train_dir / "config.yaml").is_file():
        train_argv.append("--resume")  # finished stages are kept, an interrupted one continues
    gated_dir, threads = str(train_dir / "gated"), str(args.threads)
    eval_argv = ["--checkpoint", gated_dir, "--budget", *BUDGETS, "--split", "test", "--out", str(eval_dir)]
    eval_argv += ["--threads", threads]
    demo_argv = [
        "--checkpoint",
        gated_dir,
        "--reviews",
        "2",
        "--budgets",
        "0.5",
        "0.25",
        "--threads",
        threads,
    ]
    eval_json, eval_csv = eval_cli.result_paths(eval_dir, list(BUDGETS))
    steps = [
        ("1/4 train a dense teacher and a gated MiniLM (quick config)", "train", train_cli.main, train_argv)
    ]
    if not eval_json.is_file():  # a finished evaluation is kept (re-running resumes)
        steps.append(
            (
                "2/4 evaluate the gated model at several budgets, next to dense",
                "eval",
                eval_cli.main,
                eval_argv,
            )
        )
    if not args.skip_sweep:
        sweep_argv = ["--config", str(configs / SWEEP_CONFIG), "--quick"]
        sweep_argv += [f"--quick.training_dir={train_dir}", f"--quick.output_dir={sweep_dir}"]
        sweep_argv += [f"--quick.work_dir={out / 'sweep_work'}"]
        steps.append(("3/4 sweep dynamic gates against static pruning and early exit (quick grid, one seed)",
                      "sweep", sweep.main, sweep_argv))  # fmt: skip
    steps.append(
        (
            "4/4 two reviews through the trained router",
            "demo",
            demo.main,
            demo_argv,
        )
    )
    try:
        for title, command, fn, step_argv in steps:
            _run_step(title, command, fn, step_argv)
    except QuickstartError as err:
        print(f"dynprune quickstart: error: {err}")
        return 1

    print(f"\nquickstart finished in {(time.perf_counter() - started) / 60:.1f} min. Results:")
    print(f"  training report   {train_dir / 'report' / 'summary.md'}")
    print(f"  evaluation        {eval_csv}")
    if not args.skip_sweep:
        print(f"  sweep             {sweep_dir / 'summary.md'}, {sweep_dir / 'pareto.png'}")
    print("  full recipe       docs/training.md, docs/evaluation.md")
    return 0
