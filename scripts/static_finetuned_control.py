"""The control for ``static_early_exit``'s extra training: the static_gates model fine-tuned for the
same extra steps, with no exits.

``static_early_exit`` is the static control's model (trained by the training run) plus an exit
fine-tune of the sweep's grid steps. Is what it gains over ``static_gates`` depth adaptivity, or
just those extra steps? This fine-tunes the *same* static_gates export (the sweep's work dir) at
``--budget`` for the same steps with the dense objective (labels + distillation) and measures it
like every sweep method, as method ``static_gates_ft``: its points go next to the sweep's, for
``scripts/sweep_paired.py``.

    python scripts/static_finetuned_control.py SWEEP_OUT --budget 0.25 --seeds 0 1 2 [--points DIR]

SWEEP_OUT: a finished sweep's output directory (its sweep_config.yaml is read back; the
static_gates exports come from its work_dir, built here if missing).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from dynprune.eval.runners import StructureRunner
from dynprune.eval.sweep import config_from_yaml, save_point
from dynprune.eval.sweep_context import TrainingRun, build_context, finetune
from dynprune.eval.sweep_methods import load_static_export, measure_point, static_export, static_gates_build
from dynprune.eval.timing import materialize

METHOD = "static_gates_ft"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_out", type=Path)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--points", type=Path, help="where the points go (default SWEEP_OUT/points)")
    args = ap.parse_args()
    cfg = config_from_yaml(str(args.sweep_out / "sweep_config.yaml"))
    out = args.points.parent if args.points else args.sweep_out
    if args.points and args.points.name != "points":
        raise SystemExit("--points must be a directory named 'points'")
    ctx = build_context(cfg, TrainingRun.open(cfg.training_dir))
    for seed in args.seeds:
        if (out / "points" / f"{METHOD}@{args.budget:g}_s{seed}.json").is_file():
            continue
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        path, _ = static_export(
            ctx, "static_gates", args.budget, static_gates_build(ctx, args.budget, seed), seed
        )
        model, structure = load_static_export(path)
        info = finetune(ctx, model, ctx.grid_steps, f"{METHOD}@{args.budget:g} s{seed}", seed=seed)
        for p in model.parameters():
            p.requires_grad_(False)
        row = measure_point(ctx, StructureRunner(materialize(model.eval()), structure, ctx.fm, METHOD))
        row.update(
            method=METHOD, budget=args.budget, seed=seed, finetune_steps=int(info.get("steps", 0)),
            structure=structure.summary(), seconds=round(time.perf_counter() - t0, 1),
            notes=f"static_gates export {path} fine-tuned {info.get('steps', 0)} more steps (no exits)",
        )  # fmt: skip
        save_point(out, row)
        print(
            f"{METHOD}@{args.budget:g} s{seed}: accuracy {float(row['accuracy']):.4f}, FLOPs {row['flops_ratio']:.3f}"
        )


if __name__ == "__main__":
    main()
