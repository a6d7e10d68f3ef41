"""The sweep's ``early_exit`` point: train the multi-exit model once per seed, calibrate, measure.

One early-exit model serves every budget (like the dynamic checkpoint): it is
fine-tuned once per seed for :attr:`SweepContext.grid_steps` steps — what one
method spends over the grid — with the sweep's fine-tuning settings and the
shared teacher, and cached in ``work_dir/models/early_exit_s{seed}``. Per
budget, the exit threshold is calibrated on the validation split (the first
``early_exit.calibration_examples`` of it, batched and padded like the
evaluation batches) to the largest mean FLOPs ratio not above the budget, then
the model is measured by the same code as every other method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dynprune.eval.baselines.early_exit import (
    EarlyExitModel,
    EarlyExitObjective,
    EarlyExitRunner,
    calibrate_threshold,
    exit_costs,
    load_early_exit,
    save_early_exit,
)
from dynprune.eval.sweep_context import SweepContext, _batches, finetune
from dynprune.eval.timing import materialize

WEIGHTS = "early_exit.safetensors"


def cheapest_ratio(dense_dir: Any, max_length: int) -> float:
    """The lowest mean FLOPs ratio early exit can reach: every input leaving at the first exit
    (the worst case over padded lengths 1..max_length). Built on the meta device: no weights read."""
    import torch
    from dynprune.eval.structure import static_flops_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(dense_dir))
    fm = static_flops_model(model)
    return max(exit_costs(fm, t, fm.n_layers)[0] / fm.dense(t) for t in range(1, max_length + 1))


def trained_early_exit(ctx: SweepContext, seed: int) -> tuple[EarlyExitModel, dict[str, Any]]:
    path = ctx.work / "models" / f"early_exit_s{seed}"
    if (path / "early_exit.json").is_file():
        model, info = load_early_exit(ctx.fresh_dense(), path)
    else:
        model = EarlyExitModel(ctx.fresh_dense())
        info = finetune(
            ctx, model, ctx.grid_steps, f"early_exit s{seed}", seed=seed, objective=EarlyExitObjective
        )
        save_early_exit(model, path, info)  # a crash after this point never repeats the fine-tune
    for p in model.parameters():
        p.requires_grad_(False)
    return materialize(model.eval()), {**info, "path": str(path)}


def calibration_profile(ctx: SweepContext, model: EarlyExitModel, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, FLOPs ratio) of every exit on the validation calibration examples: (L, N) each."""
    key = ("early_exit_profile", seed)
    if key not in ctx.cache:
        n = ctx.cfg.early_exit.calibration_examples
        examples = ctx.examples["validation"][:n] if n else ctx.examples["validation"]
        conf, ratios = [], []
        for batch in _batches(examples, ctx.collate, ctx.cfg.evaluation.batch_size):
            c = model.exit_profile(batch).numpy()  # (L, B)
            seq = batch["input_ids"].shape[1]
            cost = exit_costs(ctx.fm, seq, model.n_exits) / ctx.fm.dense(seq)  # (L,)
            conf.append(c)
            ratios.append(np.repeat(cost[:, None], c.shape[1], axis=1))
        ctx.cache[key] = (np.concatenate(conf, axis=1), np.concatenate(ratios, axis=1))
    return ctx.cache[key]


def point_early_exit(ctx: SweepContext, budget: float, seed: int) -> dict[str, Any]:
    from dynprune.eval.sweep_methods import measure_point

    model, info = trained_early_exit(ctx, seed)
    conf, ratios = calibration_profile(ctx, model, seed)
    threshold, val_ratio = calibrate_threshold(conf, ratios, budget)
    runner = EarlyExitRunner(model, threshold, ctx.fm)
    row = measure_point(ctx, runner)
    exits = []
    for batch in ctx.eval_batches:  # where the evaluation inputs left
        runner(batch)
        assert runner.last_exits is not None
        exits.append(runner.last_exits.numpy())
    share = np.bincount(np.concatenate(exits), minlength=model.n_exits + 1)[1:] / sum(len(e) for e in exits)
    row.update(
        disk_bytes=(ctx.work / "models" / f"early_exit_s{seed}" / WEIGHTS).stat().st_size,
        finetune_steps=int(info.get("steps", 0)),
        threshold=threshold,
        calibration_flops_ratio=val_ratio,
        calibration_examples=int(conf.shape[1]),
        exit_share=[round(float(x), 4) for x in share],
        notes=(
            f"confidence threshold {threshold:.4f} (validation mean FLOPs ratio {val_ratio:.3f} on "
            f"{conf.shape[1]} examples); share of inputs leaving at exits 1..{model.n_exits}: "
            + ", ".join(f"{x:.2f}" for x in share)
            + f"; fine-tuned once for all budgets, {int(info.get('steps', 0))} steps"
        ),
    )
    return row
